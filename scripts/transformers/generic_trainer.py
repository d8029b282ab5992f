"""A custom VLM (not a transformers class) trained with a plain `transformers.Trainer` and `rdd,pre`, through
the generic adapter: you name the embedding, the projector, the decoder layers, and how image positions are
marked (an image token id, or a boolean mask in the batch).

    python scripts/transformers/generic_trainer.py --out runs/generic [--mark token|mask] [--steps 6]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

IMAGE_ID, VOCAB = 3, 64


class TinyVLM(nn.Module):
    """Patch features -> projector -> inserted at the image-token positions -> causal decoder -> LM head."""

    def __init__(self, d=32, d_vision=24, layers=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.projector = nn.Sequential(nn.Linear(d_vision, d), nn.GELU(), nn.Linear(d, d))
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
                                    for _ in range(layers))
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids, image_features=None, attention_mask=None, labels=None, output_hidden_states=False):
        h = self.embed(input_ids)
        if image_features is not None:
            slots = input_ids == IMAGE_ID
            h = h.masked_scatter(slots[..., None], self.projector(image_features).to(h.dtype))
        causal = torch.triu(torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device), 1)
        pad = None if attention_mask is None else ~attention_mask.bool()
        states = [h]
        for layer in self.layers:
            h = layer(h, src_mask=causal, src_key_padding_mask=pad, is_causal=True)
            states.append(h)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
        return {"loss": loss, "logits": logits, "hidden_states": tuple(states) if output_hidden_states else None}


class Samples(torch.utils.data.Dataset):
    def __init__(self, n=24, n_patches=8, d_vision=24, mark="token"):
        g = torch.Generator().manual_seed(0)
        self.rows, self.mark = [], mark
        for i in range(n):
            with_image = i % 4 != 3
            text = torch.randint(4, VOCAB, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g)
            ids = torch.cat([torch.full((n_patches,), IMAGE_ID), text]) if with_image else text
            feats = torch.randn(n_patches, d_vision, generator=g) if with_image else None
            self.rows.append((ids, feats))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows, mark="token"):
    L = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (x, _) in enumerate(rows):
        ids[b, :len(x)], attn[b, :len(x)] = x, 1
    labels = ids.masked_fill((ids == IMAGE_ID) | (attn == 0), -100)
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    feats = [f for _, f in rows if f is not None]
    if feats:
        batch["image_features"] = torch.stack(feats)
    if mark == "mask":  # the model never sees this key: the adapter takes it out of the call
        batch["image_mask"] = (ids == IMAGE_ID) & attn.bool()
    return batch


def main(argv=None) -> dict:
    from transformers import Trainer, TrainingArguments

    from vlm_preserve import GenericAdapter, attach

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/generic")
    p.add_argument("--mark", choices=["token", "mask"], default="token")
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)

    torch.manual_seed(0)
    model = TinyVLM()
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Samples(), data_collator=lambda r: collate(r, a.mark))
    marking = {"image_token_id": IMAGE_ID} if a.mark == "token" else {"image_mask_key": "image_mask"}
    adapter = GenericAdapter(embed="embed", projector="projector", layers="layers", lm_head="lm_head", **marking)
    handle = attach(trainer, "rdd,pre", adapter=adapter)   # <- the one line this plugin adds
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    for r in rows:
        print({k: round(v, 4) for k, v in r.items() if k.endswith("loss")})
    handle.detach()
    return {"rows": rows, "model": model}


if __name__ == "__main__":
    main()
