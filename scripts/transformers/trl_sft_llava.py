"""TRL SFTTrainer on a tiny random Llava with `rdd,pre` — the whole integration is the `attach(...)` line.

    python scripts/transformers/trl_sft_llava.py --out runs/trl_sft [--regularizer rdd,pre] [--steps 6]

Everything is built offline: a random LlavaForConditionalGeneration from configs, a word-level tokenizer,
and pre-tokenized samples (random images, one image token per visual feature, as Llava's processor makes
them). With a real model you keep your own processor and dataset; only the attach line is new.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"


def tiny_llava_and_tokenizer():
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[PAD]", "[UNK]", "<s>", "</s>", IMAGE_TOKEN] + [f"w{i}" for i in range(120)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                          bos_token="<s>", eos_token="</s>")
    text = T.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = T.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration(T.LlavaConfig(text_config=text, vision_config=vision,
                                                          image_token_id=words.index(IMAGE_TOKEN)))
    return model, tokenizer


def samples(tokenizer, n: int, image_tokens: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    img = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    out = []
    for i in range(n):
        prompt = tokenizer(" ".join(f"w{rng.randrange(120)}" for _ in range(rng.randint(3, 6))))["input_ids"]
        answer = tokenizer(" ".join(f"w{rng.randrange(120)}" for _ in range(rng.randint(4, 9))) + " </s>")["input_ids"]
        with_image = i % 3 != 2  # every third sample is text-only, as instruction mixes are
        ids = ([img] * image_tokens if with_image else []) + prompt + answer
        labels = [-100] * (len(ids) - len(answer)) + answer
        g = torch.Generator().manual_seed(seed * 1000 + i)
        out.append({"input_ids": ids, "labels": labels,
                    "pixel_values": torch.randn(3, 32, 32, generator=g).tolist() if with_image else None})
    return out


def collate(rows: list[dict], pad_id: int = 0) -> dict:
    L = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.full((len(rows), L), pad_id), "labels": torch.full((len(rows), L), -100),
             "attention_mask": torch.zeros(len(rows), L, dtype=torch.long)}
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][b, :n] = torch.tensor(r["input_ids"])
        batch["labels"][b, :n] = torch.tensor(r["labels"])
        batch["attention_mask"][b, :n] = 1
    images = [torch.tensor(r["pixel_values"]) for r in rows if r["pixel_values"] is not None]
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch


def main(argv=None) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from vlm_preserve import attach

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/trl_sft")
    p.add_argument("--regularizer", default="rdd,pre")
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)

    model, tokenizer = tiny_llava_and_tokenizer()
    args = SFTConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=3, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                     remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(samples(tokenizer, 24)),
                         processing_class=tokenizer, data_collator=collate)
    handle = attach(trainer, a.regularizer)          # <- the one line this plugin adds
    trainer.train()
    trainer.save_model(a.out)
    handle.detach()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    for r in rows:
        print({k: round(v, 4) for k, v in r.items() if k.endswith("loss")})
    Path(a.out, "vlm_preserve_log.json").write_text(json.dumps(rows, indent=1))
    return {"rows": rows, "trainer": trainer}


if __name__ == "__main__":
    main()
