"""transformers-native VLMs, chosen by model class: Llava, LlavaNext, LlavaOnevision, Qwen2-VL, Qwen2.5-VL.

Image positions are `input_ids == config.image_token_id` (or `video_token_id`): the processor has already
expanded each placeholder to one token per visual feature, and the model `masked_scatter`s the projector
outputs into exactly those positions. The capture is two forward pre-hooks, one on the VLM (input ids,
attention mask) and one on the language model (the `inputs_embeds` it receives); neither sits inside a
checkpointed layer, so each fires once per forward under any gradient-checkpointing mode.

Module paths, new layout (transformers >= 4.52, 5.x) first, then the old one (<= 4.51).
"""
from __future__ import annotations

import torch

from ..capture import CaptureSession, StepCapture
from ..config import ConfigError
from ..patching import Patches
from .base import Adapter

SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
             "LlavaOnevisionForConditionalGeneration", "Qwen2VLForConditionalGeneration",
             "Qwen2_5_VLForConditionalGeneration")
# pre_anchor=pre_proj needs one projector input row per inserted token, in order: plain Llava only
# (LlavaNext/Onevision pack and unpad crops and add newline tokens; Qwen's merger fuses 2x2 patches).
PRE_PROJ_OK = ("LlavaForConditionalGeneration",)
LM_PATHS = ("model.language_model", "language_model.model", "model")
PROJECTOR_PATHS = ("model.multi_modal_projector", "multi_modal_projector", "model.visual.merger", "visual.merger")
LM_HEAD_PATHS = ("lm_head", "language_model.lm_head")


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def find_vlm(model):
    for m in model.modules():
        if type(m).__name__ in SUPPORTED:
            return m
    return None


def _vlm(model):
    vlm = find_vlm(model)
    if vlm is None:
        raise ConfigError(f"{type(model).__name__} is not a supported transformers VLM ({', '.join(SUPPORTED)}).")
    return vlm


def language_model(model):
    vlm = _vlm(model)
    for path in LM_PATHS:
        m = _get(vlm, path)
        if m is not None and hasattr(m, "layers") and hasattr(m, "embed_tokens"):
            return m
    raise ConfigError(f"{type(vlm).__name__}: no language model with embed_tokens/layers at {LM_PATHS}.")


def projector(model):
    vlm = _vlm(model)
    for path in PROJECTOR_PATHS:
        m = _get(vlm, path)
        if m is not None:
            return m
    raise ConfigError(f"{type(vlm).__name__}: no projector at {PROJECTOR_PATHS}.")


def image_token_ids(config) -> list[int]:
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        v = getattr(config, name, None)
        if v is not None and v not in ids:
            ids.append(int(v))
    return ids


class TransformersAdapter(Adapter):
    """The transformers VLM classes of SUPPORTED."""
    name = "transformers"

    @classmethod
    def matches(cls, model) -> bool:
        return find_vlm(model) is not None

    def model_dims(self, model) -> dict:
        cfg = _vlm(model).config
        text = getattr(cfg, "text_config", cfg)
        vision = getattr(cfg, "vision_config", None)
        return {"num_layers": len(language_model(model).layers), "hidden_size": text.hidden_size,
                "vision_hidden_size": getattr(vision, "hidden_size", None)}

    def decoder_layers(self, model):
        return language_model(model).layers

    def check_distill(self, model) -> None:
        name = type(_vlm(model)).__name__
        if name.startswith("Qwen2"):
            raise ConfigError(f"--regularizer distill does not support {name}: its language model rotates by 3-D (M-RoPE) "
                              "positions that a text-only teacher cannot reproduce, so the shared keys would not line up.")

    def llm_modules(self, model) -> list:
        vlm = _vlm(model)
        head = next((m for p in LM_HEAD_PATHS if (m := _get(vlm, p)) is not None), None)
        return [language_model(model)] + ([head] if head is not None else [])

    def projector_modules(self, model) -> list:
        return [projector(model)]

    def install_capture(self, model, session: CaptureSession, *, visual_features: bool = False) -> Patches:
        vlm = _vlm(model)
        if visual_features and type(vlm).__name__ not in PRE_PROJ_OK:
            raise ConfigError(f"--pre_anchor pre_proj is supported for {', '.join(PRE_PROJ_OK)} only; "
                              f"{type(vlm).__name__} reorders or merges vision tokens before the LLM. Use pre_llm.")
        token_ids = image_token_ids(vlm.config)
        patches, seen = Patches(), session.scratch

        def on_vlm(module, args, kwargs):
            if not session.begin_forward():
                return
            seen["input_ids"] = kwargs.get("input_ids", args[0] if args else None)
            seen["attention_mask"] = kwargs.get("attention_mask")
            seen["labels"] = kwargs.get("labels")

        def on_projector(module, args):
            seen["features"] = args[0]

        def on_lm(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            ids = seen.get("input_ids")
            if embeds is None or ids is None or not session.capturing:
                return  # no capture: total_loss says so
            if ids.shape != embeds.shape[:2]:
                raise RuntimeError(f"vlm-preserve: input_ids {tuple(ids.shape)} do not align with the language model's "
                                   f"inputs_embeds {tuple(embeds.shape[:2])}.")
            image_mask = torch.zeros_like(ids, dtype=torch.bool)
            for t in token_ids:
                image_mask |= ids == t
            attn = seen.get("attention_mask")
            attn = torch.ones_like(image_mask) if attn is None else attn.bool()
            image_mask &= attn
            feats = None
            if visual_features and "features" in seen:
                x = seen["features"]
                feats = x.reshape(-1, x.shape[-1])
                if feats.shape[0] != int(image_mask.sum()):
                    raise RuntimeError(f"vlm-preserve: {int(image_mask.sum())} image positions but {feats.shape[0]} "
                                       "projector input rows; pre_anchor=pre_proj cannot pair them.")
            elif visual_features:
                feats = embeds.new_zeros(0, self.model_dims(model)["vision_hidden_size"])
            session.record(StepCapture(inputs_embeds=embeds, image_mask=image_mask, attention_mask=attn,
                                       labels=seen.get("labels"), visual_features=feats,
                                       input_ids=ids.masked_fill(image_mask, -1)))

        patches.add_hook(vlm.register_forward_pre_hook(on_vlm, with_kwargs=True))
        patches.add_hook(language_model(model).register_forward_hook(session.keep_outputs))  # hidden_states
        head = self.llm_modules(model)[-1]
        if head is not language_model(model):  # logits; TRL's fused LM head never calls it (soft_label then says so)
            patches.add_hook(head.register_forward_hook(session.keep_outputs))
        patches.add_hook(language_model(model).register_forward_pre_hook(on_lm, with_kwargs=True))
        if visual_features:
            patches.add_hook(projector(model).register_forward_pre_hook(on_projector))
        return patches
