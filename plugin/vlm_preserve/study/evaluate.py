"""Scorers: multiple-choice log-likelihood accuracy, held-out text perplexity, easy-vqa accuracy, and paired
bootstrap confidence intervals. Per-item values are kept so every comparison with the base LLM is paired.

A choice's score is its summed log-likelihood after the prompt. The prompt runs once; its key/value cache is
repeated for the choices, so a question costs its prompt plus its choices' tokens, not (prompt × choices).
"""
from __future__ import annotations

import math
import random

import torch

from .format import answer_ids, prompt_ids


@torch.inference_mode()
def continuation_logliks(llm, prefix_embeds: torch.Tensor, conts: list[list[int]]) -> list[float]:
    """Summed log p(cont | prefix) for each continuation; `prefix_embeds` (1, P, H) are the decoder's input
    embeddings of the prompt (text, or text with projected image tokens)."""
    if any(len(c) == 0 for c in conts):
        raise ValueError("empty continuation")
    out = llm.model(inputs_embeds=prefix_embeds, use_cache=True)
    first = llm.lm_head(out.last_hidden_state[:, -1]).float().log_softmax(-1)[0]   # LM head only where scored
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(conts))
    width = max(len(c) for c in conts)
    ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in conts], device=prefix_embeds.device)
    scores = [float(first[c[0]]) for c in conts]
    if width > 1:  # right padding is harmless under causal attention: padded positions are never read
        h = llm.model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True).last_hidden_state
        logp = llm.lm_head(h).float().log_softmax(-1)
        for k, c in enumerate(conts):
            scores[k] += float(sum(logp[k, t - 1, c[t]] for t in range(1, len(c))))
    return scores


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


def mc_eval(llm, tok, questions, progress=None, scorer=None) -> list[dict]:
    """Per question: {task, acc (choice_outcome), logp (summed log-likelihood of the correct choice), n}.
    The question is the user turn; each choice is the assistant's reply. `scorer(question) -> scores` replaces
    the model (tests plant one)."""
    rows = []
    for q in questions:
        if scorer is not None:
            scores = scorer(q)
        else:
            prefix = text_embeds(llm, prompt_ids(tok, q.input))
            scores = continuation_logliks(llm, prefix, [answer_ids(tok, c, close=False) for c in q.choices])
        rows.append({"task": q.task, "acc": choice_outcome(scores, q.answer), "logp": scores[q.answer],
                     "n": len(q.choices)})
        if progress is not None:
            progress.update(1)
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


def perplexity(rows: list[dict]) -> float:
    return math.exp(sum(r["nll"] for r in rows) / max(1, sum(r["tokens"] for r in rows)))


@torch.inference_mode()
def vqa_eval(vlm, tok, items, features: torch.Tensor, answers: list[str], progress=None) -> list[dict]:
    """Per question: {acc, yes_no}: the answer among easy-vqa's closed set with the highest log-likelihood."""
    conts = [answer_ids(tok, a) for a in answers]
    dev = vlm.projector[0].weight.device
    rows = []
    for it in items:
        ids = torch.tensor([prompt_ids(tok, it.question, vlm.config.image_token_id, features.shape[1])], device=dev)
        prefix = vlm.embed(ids, features[it.image][None].to(dev))
        scores = continuation_logliks(vlm.llm, prefix, conts)
        rows.append({"acc": choice_outcome(scores, answers.index(it.answer)), "yes_no": it.answer in ("yes", "no")})
        if progress is not None:
            progress.update(1)
    return rows


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def paired_bootstrap(a: list[float], b: list[float], stat: str = "diff", n: int = 2000, seed: int = 0):
    """(point, low, high): the 95% percentile interval of mean(a) − mean(b) (`diff`) or mean(a) / mean(b)
    (`ratio`) over resamples of the items, the same items drawn for both (a and b are paired per item)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs two equal-length non-empty lists (got {len(a)} and {len(b)})")

    def f(x, y):
        return x - y if stat == "diff" else (x / y if y else float("nan"))
    if stat not in ("diff", "ratio"):
        raise ValueError(f"stat {stat!r}: use diff or ratio")
    rng = random.Random(seed)
    m = len(a)
    vals = []
    for _ in range(n):
        idx = [rng.randrange(m) for _ in range(m)]
        v = f(sum(a[i] for i in idx) / m, sum(b[i] for i in idx) / m)
        if v == v:  # a resample whose base mean is 0 has no ratio
            vals.append(v)
    vals.sort()
    if not vals:
        return f(mean(a), mean(b)), float("nan"), float("nan")
    return f(mean(a), mean(b)), vals[int(0.025 * len(vals))], vals[min(len(vals) - 1, int(0.975 * len(vals)))]
