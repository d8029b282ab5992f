"""extract-llm: a VLM's language model as a plain transformers CausalLM folder (`model.*`, `lm_head.*`, the LLM
part's config, the VLM's tokenizer), loadable by `AutoModelForCausalLM` and so by `lm_eval --model hf`.

Tensors stream through `checkpoints` (renamed, bytes unchanged); transformers is imported only to name the
CausalLM class of the config's model_type.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import ConfigError
from .checkpoints import Checkpoint, llm_name
from .writing import ShardWriter, atomic_dir, shard_names, write_index

# Upstream LLaVA/Bunny register their own model_type on top of a stock LLM's config.
UPSTREAM_MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_mpt": "mpt",
                        "llava_qwen": "qwen2", "bunny-llama": "llama", "bunny-phi": "phi", "bunny-phi3": "phi3",
                        "bunny-qwen2": "qwen2", "bunny-stablelm": "stablelm"}
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template",
                      "generation_config")


def is_tokenizer_file(p: Path) -> bool:
    return p.name.startswith(TOKENIZER_PREFIXES) or p.suffix in (".model", ".tiktoken")


def causal_lm_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"the VLM's language model has model_type {model_type!r}, which has no plain CausalLM "
                          f"class in this transformers; extract-llm works for LLMs AutoModelForCausalLM can load.")
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def llm_config(v: Checkpoint, has_lm_head: bool) -> dict:
    if not (v.path / "config.json").is_file():
        raise ConfigError(f"{v.path} has no config.json. DeepSpeed's zero_to_fp32.py writes weights only: write its "
                          "output into the checkpoint folder itself (python CKPT/zero_to_fp32.py CKPT CKPT "
                          "--safe_serialization), or copy config.json and the tokenizer files next to it.")
    cfg = json.loads((v.path / "config.json").read_text())
    if v.layout in ("native-new", "native-old"):
        text = dict(cfg["text_config"])
        for key in ("dtype", "torch_dtype"):
            if key in cfg and key not in text:
                text[key] = cfg[key]
    else:
        text = dict(cfg, model_type=UPSTREAM_MODEL_TYPES.get(cfg["model_type"], cfg["model_type"]))
    text["architectures"] = [causal_lm_class(text["model_type"])]
    text["tie_word_embeddings"] = not has_lm_head  # a tied VLM saves no lm_head
    return text


def extract_llm(vlm: str, out: str) -> Path:
    v = Checkpoint(vlm)
    with atomic_dir(out, need=sum(f.stat().st_size for f in v.path.rglob("*") if f.is_file())) as tmp:
        if v.layout == "nvila":  # already a plain CausalLM folder
            shutil.rmtree(tmp)
            shutil.copytree(v.path / "llm", tmp)
        else:
            pairs = [(n, llm_name(v.layout, n)) for n in v.names if llm_name(v.layout, n) is not None]
            by_file: dict[str, list] = {}
            for n, m in pairs:
                by_file.setdefault(v.file_of(n), []).append((n, m))
            files = dict(zip(shard_names(len(by_file)), by_file.values()))
            total = 0
            for dst, group in files.items():
                specs = [(m, *v.spec(n)) for n, m in group]
                w = ShardWriter(tmp / dst, specs)
                for n, m in group:
                    w.write(m, v.get(n))
                w.close()
                total += w.total
            write_index(tmp, {f: [m for _, m in g] for f, g in files.items()}, total)
            has_lm_head = any(m == "lm_head.weight" for _, m in pairs)
            (tmp / "config.json").write_text(json.dumps(llm_config(v, has_lm_head), indent=2) + "\n")
        for p in v.path.iterdir():
            if p.is_file() and is_tokenizer_file(p) and not (tmp / p.name).exists():
                shutil.copy2(p, tmp / p.name)
    return Path(out).absolute()
