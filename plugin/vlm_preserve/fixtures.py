"""Tiny offline fixtures: a random Llama, a slow sentencepiece tokenizer, a random CLIP vision tower and a
LLaVA-format dataset with generated images and text-only samples, all written to a directory.

They exist so that the real upstream training entry points can run end to end with no hub access
(tests, `check-upstream`, and the README's main command until the real demo exists).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

_WORDS = (
    "red green blue yellow circle square triangle shape image picture color left right top bottom "
    "what is the of in a an this that there how many small large one two three four answer question "
    "describe tell me about please shows contains looks like bright dark center corner"
).split()


@dataclass
class TinyLlavaFixture:
    root: Path
    llm: Path          # tiny LlamaForCausalLM + slow tokenizer
    vision: Path       # tiny CLIPVisionModel + CLIPImageProcessor
    data: Path         # LLaVA-format json
    images: Path       # image folder

    def train_args(self, output_dir: str | os.PathLike, **overrides) -> list[str]:
        """Upstream LLaVA `train()` flags for a short CPU run on this fixture."""
        args = {
            "model_name_or_path": str(self.llm), "version": "v1", "data_path": str(self.data),
            "image_folder": str(self.images), "vision_tower": str(self.vision),
            "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": "-2",
            "mm_use_im_start_end": "False", "mm_use_im_patch_token": "False",
            "image_aspect_ratio": "pad", "bf16": "False", "fp16": "False",
            "output_dir": str(output_dir), "num_train_epochs": "1", "max_steps": "4",
            "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1",
            "learning_rate": "1e-3", "weight_decay": "0.", "warmup_ratio": "0.",
            "lr_scheduler_type": "constant", "logging_steps": "1", "save_strategy": "no",
            "model_max_length": "128", "gradient_checkpointing": "False",
            "dataloader_num_workers": "0", "lazy_preprocess": "True", "report_to": "none",
            "seed": "0", "disable_tqdm": "True",
        }
        args.update({k: str(v) for k, v in overrides.items()})
        out: list[str] = []
        for k, v in args.items():
            out += [f"--{k}", v]
        return out


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _tokenizer(path: Path, rng: random.Random):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = path / "corpus.txt"
    # The conversation template's system prompt is repeated so BPE learns whole words: prompts stay short.
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:")
    corpus.write_text("\n".join([_sentence(rng, 12) for _ in range(400)] + [system] * 200) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path / "tokenizer"), vocab_size=600, model_type="bpe",
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
        minloglevel=2)
    corpus.unlink()
    (path / "tokenizer.vocab").unlink()
    tok = LlamaTokenizer(vocab_file=str(path / "tokenizer.model"), legacy=True)
    return tok


def build_tiny_llava(root: str | os.PathLike, *, seed: int = 0, hidden_size: int = 64, layers: int = 4,
                     n_image_samples: int = 24, n_text_samples: int = 8) -> TinyLlavaFixture:
    """Write the fixture under `root` (created) and return its paths."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    root = Path(root)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    fx = TinyLlavaFixture(root, root / "llm", root / "vision", root / "data.json", root / "images")
    for p in (fx.llm, fx.vision, fx.images):
        p.mkdir(parents=True, exist_ok=True)

    tok = _tokenizer(fx.llm, rng)
    tok.save_pretrained(fx.llm)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(fx.llm, safe_serialization=True)

    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)
    CLIPVisionModel(vcfg).save_pretrained(fx.vision, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(fx.vision)

    records = []
    for i in range(n_image_samples):
        arr = np.zeros((32 + 8 * (i % 3), 32, 3), dtype=np.uint8)  # some non-square: exercises 'pad'
        color = [rng.randrange(256) for _ in range(3)]
        y, x = rng.randrange(0, 16), rng.randrange(0, 16)
        arr[y:y + 12, x:x + 12] = color
        name = f"img_{i:03d}.png"
        Image.fromarray(arr).save(fx.images / name)
        q = _sentence(rng, rng.randint(3, 8))
        a = _sentence(rng, rng.randint(2, 10))
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        if i % 4 == 0:  # multi-turn
            conv += [{"from": "human", "value": _sentence(rng, 4)}, {"from": "gpt", "value": _sentence(rng, 5)}]
        records.append({"id": f"img{i}", "image": name, "conversations": conv})
    for i in range(n_text_samples):
        records.append({"id": f"txt{i}", "conversations": [
            {"from": "human", "value": _sentence(rng, rng.randint(4, 9))},
            {"from": "gpt", "value": _sentence(rng, rng.randint(6, 14))}]})
    rng.shuffle(records)
    fx.data.write_text(json.dumps(records, indent=1))
    return fx
