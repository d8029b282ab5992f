"""The samples file: LLaVA's data json, plus two optional fields per sample.

    [{"id": "0001", "image": "coco/0001.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                 {"from": "gpt", "value": "..."}],
      "label": "dog",                   # probe: the image's class (any string or number)
      "mask": "masks/0001.png"}]        # patch: segmentation label map, same width × height as the image

`image` and `mask` are relative to --image-folder. A mask is a single-channel PNG ('L', 'P' or 'I'):
one integer class per pixel, `ignore` (default 255, COCO-Stuff's "unlabeled") for none. Samples
without an image are skipped (no visual tokens to measure).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


class SampleError(ValueError):
    pass


@dataclass
class Sample:
    index: int            # position in the json (upstream datasets are indexed by it)
    id: str
    record: dict
    image: Path
    label: Optional[object] = None
    mask: Optional[Path] = None


def load_samples(data: str | Path, image_folder: str | Path | None, *, need_label: bool = False,
                 need_mask: bool = False, limit: int = 0) -> list[Sample]:
    data, folder = Path(data), Path(image_folder) if image_folder else Path(data).parent
    try:
        records = json.loads(data.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SampleError(f"--data {data}: cannot read a json list of samples ({e}).") from e
    if not isinstance(records, list):
        raise SampleError(f"--data {data}: expected a json list of samples (LLaVA format), got {type(records).__name__}.")
    multi = [r for r in records if isinstance(r, dict) and r.get("image") and not isinstance(r["image"], str)]
    if multi:
        raise SampleError(f"--data {data}: sample {multi[0].get('id')} has image {multi[0]['image']!r}; the diagnostics "
                          "take one image path (a string) per sample.")
    samples = [Sample(i, str(r.get("id", i)), r, folder / r["image"], r.get("label"),
                      folder / r["mask"] if r.get("mask") else None)
               for i, r in enumerate(records) if isinstance(r, dict) and r.get("image")]
    if limit:
        samples = samples[:limit]
    if not samples:
        raise SampleError(f"--data {data}: no sample with an image ({len(records)} entries, none with an 'image' "
                          "field); the diagnostics measure visual tokens, so give samples with images.")
    missing = [s for s in samples if not s.image.is_file()]
    if missing:
        raise SampleError(f"{len(missing)} image(s) not found, first: {missing[0].image} (sample {missing[0].id}); "
                          "image paths are relative to --image-folder.")
    for field, needed, metric in (("label", need_label, "probe"), ("mask", need_mask, "patch")):
        lacking = [s for s in samples if getattr(s, field) is None]
        if needed and lacking:
            raise SampleError(f"--metrics {metric} needs a '{field}' on every sample with an image; {len(lacking)} of "
                              f"{len(samples)} have none (first: sample {lacking[0].id}). Add it or drop {metric}.")
    return samples


def image_size(sample: Sample) -> tuple[int, int]:
    from PIL import Image
    with Image.open(sample.image) as im:
        return im.size


def check_label_map(sample: Sample):
    """The sample's label map opened (pixels not read yet), checked against its image's size."""
    from PIL import Image

    if not sample.mask.is_file():
        raise SampleError(f"sample {sample.id}: mask {sample.mask} not found (paths are relative to --image-folder).")
    m, size = Image.open(sample.mask), image_size(sample)
    if m.size != size:
        raise SampleError(f"sample {sample.id}: label map {sample.mask.name} is {m.size[0]}x{m.size[1]} but the image is "
                          f"{size[0]}x{size[1]} (width x height); a mask must have its image's size.")
    if m.mode not in ("L", "P", "I", "I;16"):
        raise SampleError(f"sample {sample.id}: label map {sample.mask.name} has mode {m.mode}; expected a "
                          "single-channel PNG (L, P or I) holding one class index per pixel.")
    return m


def read_label_map(sample: Sample) -> np.ndarray:
    """The sample's label map as an (H, W) int array."""
    with check_label_map(sample) as m:
        return np.asarray(m).astype(np.int64)


GEOMETRIES = ("pad", "crop", "resize")


def patch_labels(label_map: np.ndarray, grid: int, geometry: str, ignore: int = 255) -> np.ndarray:
    """Pool a label map onto the vision encoder's grid × grid patches, row-major like the tokens.

    The map first goes through the geometry the image went through: `pad` (upstream LLaVA's
    image_aspect_ratio=pad: centred on a square, the padding unlabeled), `crop` (CLIP's resize of the short
    side + centre crop: the centred square), `resize` (stretched to a square). Each patch takes the class
    covering most of its pixels (ties: the smaller class); -1 where that is `ignore`."""
    h, w = label_map.shape
    if geometry == "pad":
        s = max(h, w)
        square = np.full((s, s), ignore, dtype=np.int64)
        top, left = (s - h) // 2, (s - w) // 2
        square[top:top + h, left:left + w] = label_map
    elif geometry == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        square = label_map[top:top + s, left:left + s]
    elif geometry == "resize":
        square = label_map
    else:
        raise ValueError(f"geometry {geometry!r}: expected one of {GEOMETRIES}")
    sh, sw = square.shape
    if min(sh, sw) < grid:
        raise SampleError(f"label map of {w}x{h} pixels is smaller than the {grid}x{grid} patch grid.")
    rows = [np.arange(sh)[(np.arange(sh) * grid // sh) == i] for i in range(grid)]
    cols = [np.arange(sw)[(np.arange(sw) * grid // sw) == j] for j in range(grid)]
    out = np.empty(grid * grid, dtype=np.int64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            vals, counts = np.unique(square[np.ix_(r, c)], return_counts=True)
            cls = vals[counts.argmax()]
            out[i * grid + j] = -1 if cls == ignore else cls
    return out
