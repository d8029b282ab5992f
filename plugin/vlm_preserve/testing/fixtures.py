"""Tiny offline fixtures: a random LLM (Llama for LLaVA, Phi/Qwen2 for Bunny, Qwen2 for NVILA) with its tokenizer,
a random vision tower and a LLaVA-format dataset with generated images and text-only samples, all written to a
directory, so that the real upstream training entry points run end to end with no hub access (the tests,
`vlm-preserve check-upstream`, the benchmarks).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

WORDS = (
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
    model_type: str = ""          # build_tiny_bunny: Bunny's --model_type
    registry: Optional[Path] = None  # build_tiny_nvila: its dataset registry yaml

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


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _tokenizer(path: Path, rng: random.Random):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = path / "corpus.txt"
    # The conversation template's system prompt is repeated so BPE learns whole words: prompts stay short.
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:")
    corpus.write_text("\n".join([sentence(rng, 12) for _ in range(400)] + [system] * 200) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path / "tokenizer"), vocab_size=600, model_type="bpe",
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
        minloglevel=2)
    corpus.unlink()
    (path / "tokenizer.vocab").unlink()
    tok = LlamaTokenizer(vocab_file=str(path / "tokenizer.model"), legacy=True)
    return tok


def _records(images_dir: Path, rng: random.Random, n_image_samples: int, n_text_samples: int) -> list:
    """A LLaVA-format dataset (also Bunny's): generated shape images, some multi-turn, some text-only."""
    import numpy as np
    from PIL import Image

    records = []
    for i in range(n_image_samples):
        arr = np.zeros((32 + 8 * (i % 3), 32, 3), dtype=np.uint8)  # some non-square: exercises 'pad'
        color = [rng.randrange(256) for _ in range(3)]
        y, x = rng.randrange(0, 16), rng.randrange(0, 16)
        arr[y:y + 12, x:x + 12] = color
        name = f"img_{i:03d}.png"
        Image.fromarray(arr).save(images_dir / name)
        q = sentence(rng, rng.randint(3, 8))
        a = sentence(rng, rng.randint(2, 10))
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        if i % 4 == 0:  # multi-turn
            conv += [{"from": "human", "value": sentence(rng, 4)}, {"from": "gpt", "value": sentence(rng, 5)}]
        records.append({"id": f"img{i}", "image": name, "conversations": conv})
    for i in range(n_text_samples):
        records.append({"id": f"txt{i}", "conversations": [
            {"from": "human", "value": sentence(rng, rng.randint(4, 9))},
            {"from": "gpt", "value": sentence(rng, rng.randint(6, 14))}]})
    rng.shuffle(records)
    return records


def _start(root, seed: int, vision: str) -> tuple[TinyLlavaFixture, random.Random]:
    """The fixture's folders, created, and its seeded RNGs (python's returned; torch's set)."""
    import torch
    root = Path(root)
    if "mpt" in str(root.resolve()):
        raise ValueError(f"fixture root {root} contains 'mpt': upstream LLaVA's train() would load its LLM as an MPT "
                         "model (it tests the substring of --model_name_or_path); choose a root without it.")
    torch.manual_seed(seed)
    fx = TinyLlavaFixture(root, root / "llm", root / vision, root / "data.json", root / "images")
    for p in (fx.llm, fx.vision, fx.images):
        p.mkdir(parents=True, exist_ok=True)
    return fx, random.Random(seed)


def build_tiny_llava(root: str | os.PathLike, *, seed: int = 0, hidden_size: int = 64, layers: int = 4,
                     n_image_samples: int = 24, n_text_samples: int = 8) -> TinyLlavaFixture:
    """Write the fixture under `root` (created) and return its paths."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    fx, rng = _start(root, seed, "vision")

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

    records = _records(fx.images, rng, n_image_samples, n_text_samples)
    fx.data.write_text(json.dumps(records, indent=1))
    return fx


BUNNY_MODEL_TYPES = {"phi-2": "phi", "qwen1.5-1.8b": "qwen2"}
_EOT = "<|endoftext|>"


def byte_bpe_tokenizer(path: Path, rng: random.Random):
    """A byte-level BPE tokenizer without BOS whose only special token is <|endoftext|> (bos = eos = unk),
    the shape of phi-2's and Qwen1.5's tokenizers, which Bunny's `bunny` template is written for."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[_EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([sentence(rng, 12) for _ in range(400)] + [system] * 200, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=_EOT, eos_token=_EOT, unk_token=_EOT)
    fast.save_pretrained(path)
    return fast


def build_tiny_bunny(root: str | os.PathLike, model_type: str = "phi-2", *, seed: int = 0, hidden_size: int = 64,
                     layers: int = 4, n_image_samples: int = 24, n_text_samples: int = 8) -> TinyLlavaFixture:
    """The Bunny counterpart of `build_tiny_llava`: the LLM is built with Bunny's own vendored classes (so
    its weights load exactly as Bunny's train() expects), the vision tower is a tiny SigLIP."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    if model_type not in BUNNY_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}: fixtures exist for {', '.join(BUNNY_MODEL_TYPES)}")
    fx, rng = _start(root, seed, "siglip_vision")
    tok = byte_bpe_tokenizer(fx.llm, rng)
    common = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if BUNNY_MODEL_TYPES[model_type] == "phi":
        from bunny.model.language_model.phi import PhiConfig, PhiForCausalLM
        model = PhiForCausalLM(PhiConfig(**common, partial_rotary_factor=0.5))
    else:
        from bunny.model.language_model.qwen2 import Qwen2Config, Qwen2ForCausalLM
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2))
    model.save_pretrained(fx.llm, safe_serialization=True)
    vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    SiglipVisionModel(vcfg).save_pretrained(fx.vision, safe_serialization=True)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(fx.vision)
    fx.data.write_text(json.dumps(_records(fx.images, rng, n_image_samples, n_text_samples), indent=1))
    fx.model_type = model_type
    return fx


def bunny_train_args(fx: TinyLlavaFixture, output_dir, **overrides) -> list[str]:
    """Upstream Bunny `train()` flags for a short CPU run on a `build_tiny_bunny` fixture."""
    base = {"model_type": fx.model_type, "version": "bunny", "mm_vision_select_layer": None,
            "mm_use_im_start_end": None, "mm_use_im_patch_token": None, "model_max_length": "128"}
    args = fx.train_args(output_dir, **{k: v for k, v in base.items() if v is not None}, **overrides)
    drop = {k for k, v in base.items() if v is None}
    out, i = [], 0
    while i < len(args):  # LLaVA-only flags Bunny's dataclasses do not have
        if args[i][2:] in drop:
            i += 2
            continue
        out += args[i:i + 2]
        i += 2
    return out


_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
           "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_tiny_nvila(root: str | os.PathLike, *, seed: int = 0, hidden_size: int = 64, layers: int = 4,
                     n_image_samples: int = 12, n_text_samples: int = 4) -> TinyLlavaFixture:
    """The NVILA counterpart: a tiny Qwen2 LLM with a ChatML byte-level BPE tokenizer (no BOS, like Qwen2), a tiny
    SigLIP tower (56 px, 14 px patches: 16 patches, 4 LLM tokens after mlp_downsample), LLaVA-format data and
    `datasets.yaml`, the registry NVILA's `--data_mixture tiny` reads through VILA_DATASETS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)

    fx, rng = _start(root, seed, "siglip_vision")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([sentence(rng, 12) for _ in range(400)] + ["system user assistant"] * 50,
                            trainers.BpeTrainer(vocab_size=600, special_tokens=[_EOT, "<|im_start|>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token=_EOT)
    fast.chat_template = _CHATML
    fast.save_pretrained(fx.llm)
    cfg = Qwen2Config(vocab_size=len(fast) + 8, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=fast.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(fx.llm, safe_serialization=True)
    vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    SiglipVisionModel(vcfg).save_pretrained(fx.vision, safe_serialization=True)
    SiglipImageProcessor(size={"height": 56, "width": 56}).save_pretrained(fx.vision)
    fx.data.write_text(json.dumps(_records(fx.images, rng, n_image_samples, n_text_samples), indent=1))
    fx.registry = fx.root / "datasets.yaml"
    fx.registry.write_text(f"tiny:\n    _target_: llava.data.LLaVADataset\n    data_path: {fx.data}\n"
                           f"    media_dir: {fx.images}\n")
    return fx


def nvila_train_args(fx: TinyLlavaFixture, output_dir, **overrides) -> list[str]:
    """NVILA `train_mem.py` flags for a short CPU run on a `build_tiny_nvila` fixture (run with
    VILA_DATASETS=fx.registry in the environment)."""
    args = {
        "model_name_or_path": str(fx.llm), "vision_tower": str(fx.vision), "mm_projector": "mlp_downsample",
        "mm_vision_select_feature": "cls_patch", "mm_vision_select_layer": "-2", "data_mixture": "tiny",
        "chat_template": "qwen2", "tune_vision_tower": "False", "tune_mm_projector": "True",
        "tune_language_model": "True", "image_aspect_ratio": "resize", "output_dir": str(output_dir),
        "max_steps": "3", "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1",
        "learning_rate": "1e-3", "weight_decay": "0.", "lr_scheduler_type": "constant", "logging_steps": "1",
        "save_strategy": "no", "model_max_length": "256", "gradient_checkpointing": "False",
        "dataloader_num_workers": "0", "report_to": "none", "seed": "0", "disable_tqdm": "True",
    }
    args.update({k: str(v) for k, v in overrides.items()})
    return [w for k, v in args.items() for w in (f"--{k}", v)]
