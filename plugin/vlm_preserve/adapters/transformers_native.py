"""transformers-native VLMs, chosen by model class: Llava, LlavaNext, LlavaOnevision, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Gemma 3, InternVL, Idefics3, SmolVLM, PaliGemma.

Image positions are `input_ids == config.image_token_id` (or `video_token_id`): the processor has already
expanded each placeholder to one token per visual feature, and the model `masked_scatter`s the projector
outputs into exactly those positions. The capture is two forward pre-hooks, one on the VLM (input ids,
attention mask) and one on the language model (the `inputs_embeds` it receives); neither sits inside a
checkpointed layer, so each fires once per forward under any gradient-checkpointing mode.

What the terms see where a model departs from that picture:
- Qwen3-VL also adds "deepstack" features of earlier vision layers to the visual positions after its first
  decoder layers. RDD and the pre_llm anchor are the merger's output, the LLM's input; PRe's layer-l output is
  the decoder layer's own output (deepstack features are added after it, between layers).
- Gemma 3 (among an image's tokens) and PaliGemma (over the whole image + prompt prefix) attend
  bidirectionally when given the processor's token_type_ids. RDD and PRe read the captured states whatever
  the attention pattern; distill's causal teacher cannot follow PaliGemma's prompt, so it is refused there.
- Idefics3/SmolVLM split an image into crops plus the global image, each a run of image tokens between text
  tokens; their features arrive in the same order, one per token.
Refused: a model whose images enter by cross-attention (Mllama) has no visual tokens in the LLM's sequence.

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
             "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration", "Gemma3ForConditionalGeneration",
             "InternVLForConditionalGeneration", "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration",
             "PaliGemmaForConditionalGeneration")
CROSS_ATTENTION = ("MllamaForConditionalGeneration",)
# pre_anchor=pre_proj needs one projector input row per inserted token, in order: plain Llava and PaliGemma
# (LlavaNext/Onevision pack and unpad crops and add newline tokens; the Qwen mergers, InternVL's and Idefics3's
# pixel shuffle and Gemma 3's pooling fuse several patches into one token).
PRE_PROJ_OK = ("LlavaForConditionalGeneration", "PaliGemmaForConditionalGeneration")
LM_PATHS = ("model.language_model", "language_model.model", "model.text_model", "model")
PROJECTOR_PATHS = ("model.multi_modal_projector", "multi_modal_projector", "model.visual.merger", "visual.merger",
                   "model.connector")
# More vision-to-LLM projections, trained with the projector under attention_tuning: Qwen3-VL's deepstack mergers.
EXTRA_PROJECTOR_PATHS = ("model.visual.deepstack_merger_list",)
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
        if type(m).__name__ in CROSS_ATTENTION:
            raise ConfigError(f"{type(m).__name__} is not supported: its images enter the language model by "
                              "cross-attention, so there are no visual tokens in the LLM's sequence for RDD or PRe "
                              "to act on.")
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
        if name.startswith("Qwen"):
            raise ConfigError(f"--regularizer distill does not support {name}: its language model rotates by 3-D (M-RoPE) "
                              "positions that a text-only teacher cannot reproduce, so the shared keys would not line up.")
        if name.startswith("PaliGemma"):
            raise ConfigError(f"--regularizer distill does not support {name}: its prompt attends bidirectionally "
                              "(prefix-LM), which a causal text-only teacher cannot reproduce.")

    def llm_modules(self, model) -> list:
        vlm = _vlm(model)
        head = next((m for p in LM_HEAD_PATHS if (m := _get(vlm, p)) is not None), None)
        return [language_model(model)] + ([head] if head is not None else [])

    def projector_modules(self, model) -> list:
        vlm = _vlm(model)
        return [projector(model)] + [m for p in EXTRA_PROJECTOR_PATHS if (m := _get(vlm, p)) is not None]

    def install_capture(self, model, session: CaptureSession, *, visual_features: bool = False) -> Patches:
        vlm = _vlm(model)
        if visual_features and type(vlm).__name__ not in PRE_PROJ_OK:
            raise ConfigError(f"--pre_anchor pre_proj is supported for {', '.join(PRE_PROJ_OK)} only; "
                              f"{type(vlm).__name__} reorders or merges vision tokens before the LLM. Use pre_llm.")
        token_ids = image_token_ids(vlm.config)
        patches, seen = Patches(), session.scratch

        def on_vlm(module, args, kwargs, top=True):
            # The VLM's own forward or, where a wrapper calls its forward() directly and so skips its hooks (PEFT's
            # LoRA model does), its inner base model: whichever fires first starts this forward's capture.
            if top or not seen.get("top"):
                if not session.begin_forward():
                    return
                seen["top"] = top
            for key, value in (("input_ids", kwargs.get("input_ids", args[0] if args else None)),
                               ("attention_mask", kwargs.get("attention_mask")), ("labels", kwargs.get("labels"))):
                if seen.get(key) is None:
                    seen[key] = value

        def on_projector(module, args):
            seen["features"] = args[0]

        def on_lm(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            if embeds is None or not session.capturing:
                return
            for key in ("input_ids", "attention_mask", "labels"):  # what an outer wrapper took out of the forward
                fallback = session.batch.get(key)
                if seen.get(key) is None and fallback is not None and fallback.shape[:2] == embeds.shape[:2]:
                    seen[key] = fallback
            ids = seen.get("input_ids")
            if ids is None:
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
        inner = getattr(vlm, "model", None)
        if isinstance(inner, torch.nn.Module) and inner is not language_model(model):
            patches.add_hook(inner.register_forward_pre_hook(lambda m, a, k: on_vlm(m, a, k, top=False),
                                                             with_kwargs=True))
        patches.add_hook(language_model(model).register_forward_hook(session.keep_outputs))  # hidden_states
        head = self.llm_modules(model)[-1]
        if head is not language_model(model):  # logits; TRL's fused LM head never calls it (soft_label then says so)
            patches.add_hook(head.register_forward_hook(session.keep_outputs))
        patches.add_hook(language_model(model).register_forward_pre_hook(on_lm, with_kwargs=True))
        if visual_features:
            patches.add_hook(projector(model).register_forward_pre_hook(on_projector))
        return patches
