"""Scorers: multiple-choice log-likelihood accuracy, held-out text perplexity, easy-vqa accuracy, and paired
bootstrap confidence intervals. Per-item values are kept so every comparison with the base LLM is paired.

A choice's score is its summed log-likelihood after the prompt. The prompt runs once; its key/value cache is
repeated for the choices, so a question costs its prompt plus its choices' tokens, not (prompt × choices).
"""
from __future__ import annotations

import functools
import math
import random

import numpy as np

import torch

from .format import answer_ids, prompt_ids


@torch.inference_mode()
def continuation_logliks(llm, prefix_embeds: torch.Tensor, conts: list[list[int]]) -> list[float]:
    """Summed log p(cont | prefix) for each continuation; `prefix_embeds` (1, P, H) are the decoder's input
    embeddings of the prompt (text, or text with projected image tokens)."""
    return batch_continuation_logliks(llm, [prefix_embeds[0]], [conts])[0]


@torch.inference_mode()
def batch_continuation_logliks(llm, prefixes: list[torch.Tensor], conts: list[list[list[int]]]) -> list[list[float]]:
    """For each prompt (P_i, H) its continuations' summed log-likelihoods. The prompts run as one left-padded
    batch (attention mask, positions counted from each prompt's own start); each prompt's key/value cache is
    repeated for its continuations, which run as one right-padded batch (padding after a continuation is never
    read: attention is causal)."""
    if any(len(c) == 0 for cs in conts for c in cs):
        raise ValueError("empty continuation")
    dev, lens = prefixes[0].device, [p.shape[0] for p in prefixes]
    width = max(lens)
    emb = prefixes[0].new_zeros(len(prefixes), width, prefixes[0].shape[-1])
    mask = torch.zeros(len(prefixes), width, dtype=torch.long, device=dev)
    for i, p in enumerate(prefixes):
        emb[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = llm.model(inputs_embeds=emb, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    use_cache=True)
    first = llm.lm_head(out.last_hidden_state[:, -1]).float().log_softmax(-1)   # LM head only where scored
    rows = [(i, c) for i, cs in enumerate(conts) for c in cs]
    scores = [float(first[i, c[0]]) for i, c in rows]
    longest = max(len(c) for _, c in rows)
    if longest > 1:
        idx = torch.tensor([i for i, _ in rows], device=dev)
        cache = out.past_key_values
        cache.batch_select_indices(idx)
        ids = torch.tensor([c[:-1] + [c[-1]] * (longest - len(c)) for _, c in rows], device=dev)
        mask = torch.cat([mask[idx], torch.ones_like(ids)], 1)
        pos = torch.tensor(lens, device=dev)[idx, None] + torch.arange(longest - 1, device=dev)
        h = llm.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                      use_cache=True).last_hidden_state
        for k, (_, c) in enumerate(rows):
            if len(c) > 1:
                logp = llm.lm_head(h[k, :len(c) - 1]).float().log_softmax(-1)
                scores[k] += float(logp.gather(-1, torch.tensor(c[1:], device=dev)[:, None]).sum())
    out, k = [], 0
    for cs in conts:
        out.append(scores[k:k + len(cs)])
        k += len(cs)
    return out


def choice_outcome(scores: list[float], answer: int) -> float:
    """1 if the correct choice scores strictly highest; a tie at the top counts 1/(number tied), the expected
    accuracy of breaking it at random — so a model indifferent between all choices scores exactly chance."""
    best = max(scores)
    if scores[answer] < best:
        return 0.0
    return 1.0 / sum(1 for s in scores if s == best)


def text_embeds(llm, ids: list[int]) -> torch.Tensor:
    dev = llm.get_input_embeddings().weight.device
    return llm.get_input_embeddings()(torch.tensor([ids], device=dev))


def mc_eval(llm, tok, questions, progress=None, scorer=None, batch: int = 16) -> list[dict]:
    """Per question: {task, acc (choice_outcome), logp (summed log-likelihood of the correct choice), n}.
    The question is the user turn; each choice is the assistant's reply. `scorer(question) -> scores` replaces
    the model (tests plant one)."""
    rows = []
    for s in range(0, len(questions), batch):
        qs = questions[s:s + batch]
        if scorer is not None:
            scores = [scorer(q) for q in qs]
        else:
            scores = batch_continuation_logliks(llm, [text_embeds(llm, prompt_ids(tok, q.input))[0] for q in qs],
                                                [[answer_ids(tok, c, close=False) for c in q.choices] for q in qs])
        for q, sc in zip(qs, scores):
            rows.append({"task": q.task, "acc": choice_outcome(sc, q.answer), "logp": sc[q.answer],
                         "n": len(q.choices)})
        if progress is not None:
            progress.update(len(qs))
    return rows


@torch.inference_mode()
def text_nll(llm, tok, texts: list[str], max_len: int = 256, batch: int = 8) -> list[dict]:
    """Per text: {nll: summed negative log-likelihood of its tokens after the first, tokens: how many}."""
    rows = []
    dev = llm.get_input_embeddings().weight.device
    for i in range(0, len(texts), batch):
        enc = [tok.encode(t, add_special_tokens=False)[:max_len] for t in texts[i:i + batch]]
        n = max(len(e) for e in enc)
        ids = torch.tensor([e + [0] * (n - len(e)) for e in enc], device=dev)
        mask = torch.tensor([[1] * len(e) + [0] * (n - len(e)) for e in enc], device=dev)
        h = llm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logp = llm.lm_head(h[:, :-1]).float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        for k in range(len(enc)):
            rows.append({"nll": float(-logp[k][keep[k]].sum()), "tokens": int(keep[k].sum())})
    return rows


@torch.inference_mode()
def reply_nll(llm, pairs: list[tuple[list[int], list[int]]], end_id: int | None = None, batch: int = 8) -> list[dict]:
    """Per (prompt ids, reply ids): {nll: mean token NLL of the reply given the prompt, tokens, and with `end_id`
    p_end1: the probability of `end_id` right after the reply's first token (closing the turn early)}.
    Batched with right padding, similar lengths together; the LM head runs only where a reply token is scored."""
    if any(not p or not r for p, r in pairs):
        raise ValueError("reply_nll needs a non-empty prompt and reply for every item")
    dev = llm.get_input_embeddings().weight.device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    rows: list[dict] = [{} for _ in pairs]
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        n = max(len(q) for q in seqs)
        ids = torch.tensor([q + [0] * (n - len(q)) for q in seqs], device=dev)
        mask = torch.tensor([[1] * len(q) + [0] * (n - len(q)) for q in seqs], device=dev)
        h = llm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for k, i in enumerate(idx):
            p, r = pairs[i]
            logp = llm.lm_head(h[k, len(p) - 1:len(p) + len(r) - 1]).float().log_softmax(-1)
            tok = logp.gather(-1, torch.tensor(r, device=dev)[:, None])[:, 0]
            rows[i] = {"nll": float(-tok.mean()), "tokens": len(r)}
            if end_id is not None:
                rows[i]["p_end1"] = float(logp[1, end_id].exp()) if len(r) > 1 else float("nan")
    return rows


def chat_pairs(tok, items: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt, reply) ids of chat items in the ChatML the VLM is tuned in (study/format.py): the turns, then the
    assistant's reference reply closed by <|im_end|>."""
    from .format import chat_prompt_ids
    return [(chat_prompt_ids(tok, it["turns"]), answer_ids(tok, it["reply"])) for it in items]


def text_pairs(tok, texts: list[str], max_tokens: int = 128) -> list[tuple[list[int], list[int]]]:
    """Plain text, no template: the first token conditions, the next `max_tokens` - 1 are scored."""
    out = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)[:max_tokens]
        out.append((ids[:1], ids[1:]))
    return out


def perplexity(rows: list[dict]) -> float:
    return math.exp(sum(r["nll"] for r in rows) / max(1, sum(r["tokens"] for r in rows)))


@torch.inference_mode()
def vqa_eval(vlm, tok, items, features: torch.Tensor, answers: list[str], progress=None, batch: int = 16) -> list[dict]:
    """Per question: {acc, yes_no, pred}: pred is the answer among easy-vqa's closed set with the highest
    log-likelihood (the first on a tie, which acc counts as a share)."""
    conts = [answer_ids(tok, a) for a in answers]
    dev = vlm.projector[0].weight.device
    rows = []
    for s in range(0, len(items), batch):
        its = items[s:s + batch]
        prefixes = [vlm.embed(torch.tensor([prompt_ids(tok, it.question, vlm.config.image_token_id,
                                                       features.shape[1])], device=dev),
                              features[it.image][None].to(dev))[0] for it in its]
        for it, scores in zip(its, batch_continuation_logliks(vlm.llm, prefixes, [conts] * len(its))):
            rows.append({"acc": choice_outcome(scores, answers.index(it.answer)),
                         "yes_no": it.answer in ("yes", "no"), "pred": answers[scores.index(max(scores))]})
        if progress is not None:
            progress.update(len(its))
    return rows


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


@functools.lru_cache(maxsize=8)
def _resamples(m: int, n: int, seed: int) -> np.ndarray:
    """(n, m) item indices, drawn as the report always drew them, so a cached draw changes no figure."""
    rng = random.Random(seed)
    return np.array([[rng.randrange(m) for _ in range(m)] for _ in range(n)], dtype=np.int64)


def bootstrap(columns: list[list[float]], stat, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): `stat(means)` on the columns' means, and its 95% percentile interval over resamples of
    the items, the same items drawn for every column (they are paired per item). NaN resamples are dropped."""
    m = len(columns[0])
    if not m or any(len(c) != m for c in columns):
        raise ValueError(f"bootstrap needs equal-length non-empty columns (got {[len(c) for c in columns]})")
    idx = _resamples(m, n, seed)
    # accumulate, not sum: left to right like Python's sum, so the figures do not move in the last digit
    means = [(np.add.accumulate(np.asarray(c, dtype=np.float64)[idx], axis=1)[:, -1] / m).tolist() for c in columns]
    vals = []
    for r in zip(*means):
        v = stat(list(r))
        if v == v:
            vals.append(v)
    vals.sort()
    point = stat([mean(c) for c in columns])
    if not vals:
        return point, float("nan"), float("nan")
    return point, vals[int(0.025 * len(vals))], vals[min(len(vals) - 1, int(0.975 * len(vals)))]


def recovery(method: list[float], full: list[float], base: list[float], n: int = 2000, seed: int = 0):
    """(point, low, high) of (method − full) / (base − full), per-item paired: the share of Full-Tuning's change
    from the base LLM that the method avoids (1 = none of it, 0 = all of it, < 0 = worse than Full-Tuning)."""
    def f(x):
        return (x[0] - x[1]) / (x[2] - x[1]) if x[2] != x[1] else float("nan")
    return bootstrap([method, full, base], f, n, seed)


def paired_bootstrap(a: list[float], b: list[float], stat: str = "diff", n: int = 2000, seed: int = 0):
    """(point, low, high): the 95% percentile interval of mean(a) − mean(b) (`diff`) or mean(a) / mean(b)
    (`ratio`) over resamples of the items, the same items drawn for both (a and b are paired per item)."""
    if stat not in ("diff", "ratio"):
        raise ValueError(f"stat {stat!r}: use diff or ratio")
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs two equal-length non-empty lists (got {len(a)} and {len(b)})")
    if stat == "diff":
        return bootstrap([a, b], lambda x: x[0] - x[1], n, seed)
    return bootstrap([a, b], lambda x: x[0] / x[1] if x[1] else float("nan"), n, seed)
