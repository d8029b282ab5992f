"""A tiny labelled sample set for `vlm-preserve diagnose` (test_diagnose.py, test_diagnose_e2e.py)."""
import json
import os
import random
from pathlib import Path

from vlm_preserve.testing.fixtures import sentence


def write_diagnose_samples(root: str | os.PathLike, *, n: int = 8, seed: int = 0, size: tuple = (40, 32)) -> Path:
    """A samples json for `vlm-preserve diagnose` under `root`: images (width x height = `size`) of a red or
    blue square on a dark background, each with a `label` (the colour) and a `mask` (0 background, 1 square,
    255 a one-pixel unlabeled border). Returns the json's path; image and mask paths are relative to root."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = random.Random(seed)
    w, h = size
    records = []
    for i in range(n):
        label = ("red", "blue")[i % 2]
        img = np.full((h, w, 3), 20, dtype=np.uint8)
        mask = np.zeros((h, w), dtype=np.uint8)
        s = rng.randint(h // 3, h // 2)
        y, x = rng.randrange(1, h - s), rng.randrange(1, w - s)
        img[y:y + s, x:x + s] = (220, 30, 30) if label == "red" else (30, 30, 220)
        mask[y:y + s, x:x + s] = 1
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 255
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
        records.append({"id": f"s{i}", "image": f"images/{i:03d}.png", "mask": f"masks/{i:03d}.png", "label": label,
                        "conversations": [{"from": "human", "value": f"<image>\nWhat colour is the {sentence(rng, 2)}?"},
                                          {"from": "gpt", "value": f"It is {label}."}]})
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "hello"},
                                                          {"from": "gpt", "value": "hi"}]})
    data = root / "samples.json"
    data.write_text(json.dumps(records, indent=1))
    return data
