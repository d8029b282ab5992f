"""Tiny checkpoints in every layout the offline tools read, written at test time: a base LlamaForCausalLM and
VLMs whose language model is that LLM plus noise, with 2 embedding rows added for new tokens.

Each VLM's tensor names are mapped to the LLM's here by hand (not through vlm_preserve.offline.checkpoints), so a
wrong mapping in the plugin cannot hide behind the same mistake in the fixture."""
import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADDED = 2  # tokens the VLM added (<image>, <pad>)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, tie_word_embeddings=False)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=32,
              patch_size=8)
NEW_TO_OLD = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
              "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector."}


def _rename(name: str, table: dict) -> str:
    for a, b in table.items():
        if name.startswith(a):
            return b + name[len(a):]
    return name


def to_llm(layout: str, name: str):
    """The base-LLM name of a VLM tensor, or None (written independently of the plugin's mapping)."""
    if layout == "native-new":
        return ("model." + name[len("model.language_model."):] if name.startswith("model.language_model.")
                else name if name.startswith("lm_head.") else None)
    if layout == "native-old":
        return name[len("language_model."):] if name.startswith("language_model.") else None
    if layout == "llava":
        return None if name.startswith(("model.mm_projector.", "model.vision_tower.")) else name
    if layout == "nvila":
        return name[len("llm/"):] if name.startswith("llm/") else None
    raise ValueError(layout)


def tokenizer(path: Path, added: int = 0):
    from vlm_preserve.testing.fixtures import byte_bpe_tokenizer
    tok = byte_bpe_tokenizer(path, random.Random(0))
    if added:
        tok.add_special_tokens({"additional_special_tokens": ["<image>", "<im_pad>"][:added]})
        tok.save_pretrained(path)
    return tok


def base_llm(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    tok = tokenizer(path)
    cfg = LlamaConfig(vocab_size=len(tok), **dict(TEXT, **overrides))
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def llm_tensors(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def _perturb(files, layout: str, base: dict, seed: int, prefix: str = "") -> None:
    """Set every LLM-part tensor to base + noise (added embedding rows stay random): theta_vlm != theta_llm."""
    g = torch.Generator().manual_seed(seed)
    for f in files:
        sd = load_file(str(f))
        for name, t in sd.items():
            m = to_llm(layout, prefix + name)
            if m is None:
                continue
            b = base[m]
            new = b + 0.02 * torch.randn(b.shape, generator=g)
            sd[name] = torch.cat([new, t[b.shape[0]:]]) if t.shape != b.shape else new
        save_file(sd, str(f), metadata={"format": "pt"})


def native_vlm(path: Path, base: Path, layout: str = "native-new", seed: int = 1) -> Path:
    """A LlavaForConditionalGeneration saved by this transformers, rewritten to `layout` if it saves the other."""
    import transformers as T
    torch.manual_seed(seed)
    tok = tokenizer(path, ADDED)
    text = T.LlamaConfig(vocab_size=len(tok), **TEXT)
    cfg = T.LlavaConfig(text_config=text, vision_config=T.CLIPVisionConfig(**VISION), image_token_index=len(tok) - 2)
    T.LlavaForConditionalGeneration(cfg).save_pretrained(path, safe_serialization=True)
    f = path / "model.safetensors"
    sd = load_file(str(f))
    saved = "native-new" if any(k.startswith("model.language_model.") for k in sd) else "native-old"
    if saved != layout:
        table = NEW_TO_OLD if layout == "native-old" else {b: a for a, b in NEW_TO_OLD.items()}
        save_file({_rename(k, table): v for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    _perturb([f], layout, llm_tensors(base), seed)
    return path


def llava_vlm(path: Path, base: Path, seed: int = 2, bin_shards: bool = False) -> Path:
    """Upstream LLaVA layout by hand: the LLM's names plus model.mm_projector.* and model.vision_tower.*; with
    `bin_shards`, two pytorch_model-*.bin shards and their index (what older LLaVA releases ship)."""
    tok = tokenizer(path, ADDED)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, b in llm_tensors(base).items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            b = torch.cat([b, torch.randn(ADDED, b.shape[1], generator=g)])
        sd[name] = b.clone()
    sd["model.mm_projector.0.weight"] = torch.randn(32, 24, generator=g)
    sd["model.mm_projector.0.bias"] = torch.randn(32, generator=g).to(torch.bfloat16)  # dtypes other than the LLM's
    sd["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.randn(24, 3, 8, 8, generator=g)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], vocab_size=len(tok),
               mm_projector_type="linear", mm_hidden_size=24, mm_vision_tower="openai/clip-vit-large-patch14")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if bin_shards:
        names = sorted(sd)
        halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for f, ns in halves.items():
            torch.save({n: sd[n] for n in ns}, path / f)
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for f, ns in halves.items() for n in ns}}))
        # perturb in place (the .bin path of _perturb)
        base_sd = llm_tensors(base)
        for f, ns in halves.items():
            part = torch.load(path / f)
            for n in ns:
                m = to_llm("llava", n)
                if m:
                    b = base_sd[m]
                    new = b + 0.02 * torch.randn(b.shape, generator=g)
                    part[n] = torch.cat([new, torch.randn(ADDED, b.shape[1], generator=g)]) if part[n].shape != b.shape else new
            torch.save(part, path / f)
    else:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        _perturb([path / "model.safetensors"], "llava", llm_tensors(base), seed)
    return path


def nvila_vlm(path: Path, base: Path, seed: int = 3) -> Path:
    """NVILA's folder: llm/ (a plain CausalLM checkpoint), vision_tower/, mm_projector/, top-level config."""
    import shutil
    shutil.copytree(base, path / "llm")
    tokenizer(path / "llm", ADDED)
    g = torch.Generator().manual_seed(seed)
    sd = llm_tensors(base)
    for name in list(sd):
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            sd[name] = torch.cat([sd[name], torch.randn(ADDED, sd[name].shape[1], generator=g)])
    cfg = json.loads((base / "config.json").read_text())
    cfg["vocab_size"] += ADDED
    (path / "llm" / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(path / "llm" / "model.safetensors"), metadata={"format": "pt"})
    _perturb([path / "llm" / "model.safetensors"], "nvila", llm_tensors(base), seed, prefix="llm/")
    for sub, shapes in {"vision_tower": {"embeddings.weight": (24, 3, 8, 8)},
                        "mm_projector": {"layers.0.weight": (32, 24), "layers.0.bias": (32,)}}.items():
        (path / sub).mkdir()
        save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(path / sub / "model.safetensors"),
                  metadata={"format": "pt"})
        (path / sub / "config.json").write_text(json.dumps({"model_type": sub}))
    (path / "config.json").write_text(json.dumps({"architectures": ["VILAForCausalLM"], "model_type": "vila",
                                                  "llm_cfg": "llm", "vision_tower_cfg": "vision_tower"}))
    return path


def build_vlm(layout: str, path: Path, base: Path) -> Path:
    path.mkdir(parents=True)
    if layout in ("native-new", "native-old"):
        return native_vlm(path, base, layout)
    if layout == "llava":
        return llava_vlm(path, base)
    if layout == "llava-bin":
        return llava_vlm(path, base, bin_shards=True)
    return nvila_vlm(path, base)


def read_all(folder: Path) -> dict:
    """Every tensor of a checkpoint folder, keyed like vlm_preserve.offline.checkpoints (NVILA: 'llm/<name>')."""
    out = {}
    for f in sorted(folder.rglob("*")):
        rel = f.parent.relative_to(folder)
        prefix = "" if str(rel) == "." else f"{rel}/"
        if f.suffix == ".safetensors":
            out.update({prefix + k: v for k, v in load_file(str(f)).items()})
        elif f.suffix == ".bin":
            out.update({prefix + k: v for k, v in torch.load(f).items()})
    return out
