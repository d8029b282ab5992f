"""Samples as token ids in SmolLM2's ChatML format, and the collator.

    <|im_start|>user\\n[49 image tokens]\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>

Only the answer (and its closing <|im_end|>) is supervised. Text-only samples are the same without the image.
"""
from __future__ import annotations

import torch

from ..config import IGNORE_INDEX


def prompt_ids(tok, text: str, image_token_id: int | None = None, n_image: int = 0) -> list[int]:
    head = tok.encode("<|im_start|>user\n", add_special_tokens=False)
    img = [image_token_id] * n_image + tok.encode("\n", add_special_tokens=False) if n_image else []
    tail = tok.encode(f"{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    return head + img + tail


def chat_prompt_ids(tok, turns: list) -> list[int]:
    """A text-only conversation [[role, text], ...] (last turn the user's) up to the assistant's reply."""
    text = "".join(f"<|im_start|>{role}\n{t}<|im_end|>\n" for role, t in turns) + "<|im_start|>assistant\n"
    return tok.encode(text, add_special_tokens=False)


def answer_ids(tok, answer: str, close: bool = True) -> list[int]:
    return tok.encode(answer + ("<|im_end|>" if close else ""), add_special_tokens=False)


def sample(tok, question: str, answer: str, image: int | None = None, image_token_id: int | None = None,
           n_image: int = 0, max_len: int = 256) -> dict:
    """One training sample: {input_ids, labels, image (row in the feature tensor, -1 for text-only)}.
    Long text-only prompts are cut from the left of the question so the answer always stays supervised."""
    p = prompt_ids(tok, question, image_token_id, n_image if image is not None else 0)
    a = answer_ids(tok, answer)
    if len(p) + len(a) > max_len:
        if image is not None:
            raise ValueError(f"image sample longer than max_len={max_len}")
        p = p[:3] + p[len(p) + len(a) - max_len + 3:]
    return {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a, "image": -1 if image is None else image}


class Collator:
    """Right-padded batch for StudyVLM: input_ids, attention_mask, labels, image_features (B, 49, D) — zeros for
    text-only rows, which the model never projects."""

    def __init__(self, features: torch.Tensor, pad_id: int):
        self.features, self.pad_id = features, pad_id

    def __call__(self, rows: list[dict]) -> dict:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(rows), n), dtype=torch.long)
        feats = torch.zeros((len(rows),) + tuple(self.features.shape[1:]), dtype=torch.float32)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            attn[i, :k] = 1
            if r["image"] >= 0:
                feats[i] = self.features[r["image"]].float()
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "image_features": feats}
