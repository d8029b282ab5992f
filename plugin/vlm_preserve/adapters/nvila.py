"""NVILA (NVlabs/VILA, import name `llava`, pinned in third_party/nvila). Every symbol touched is declared in
upstream_symbols/nvila/symbols.json.

`LlavaLlamaModel` is a wrapper: `model.llm` (a CausalLM: `.model.embed_tokens`, `.model.layers`, `.model.norm`,
`.lm_head`), `model.vision_tower`, `model.mm_projector`. Media tokens are real vocabulary ids; `_embed` replaces
each by its encoder's output, which adds start/end text embeddings around the features ("\\n" after each image);
in training `repack_multimodal_data` then packs the batch into one row.

Image positions, in the same forward: (1) each encoder's `_process_features` is wrapped to run once more on a
features-shaped tensor of ones with the start/end embeddings zeroed, which gives the layout of that media object
(features = True); (2) `_embed` runs with the caller's ignored labels (-100) marked by a spare value, so its only
fresh -100 labels among attended positions are the media objects, in order; the layouts fill those positions;
(3) `repack_multimodal_data`'s packing (attended positions of each row, in row order, then one padding token)
is applied to the mask too.
"""
from __future__ import annotations

from collections import defaultdict, deque

import torch

from ..capture import CaptureSession, StepCapture
from ..config import IGNORE_INDEX, ConfigError
from ..patching import Patches
from .base import Adapter

# Stands in for the caller's -100 labels while upstream's _embed runs, so the -100s it writes mark exactly the media
# positions; any value no label can take would do.
_SPARE = -12345


def find_nvila(model):
    """The upstream LlavaMetaForCausalLM wrapper inside any wrapper (PEFT, DeepSpeed, DDP); None where there is none."""
    for m in model.modules():
        if hasattr(type(m), "repack_multimodal_data") and hasattr(type(m), "_embed") and hasattr(m, "llm"):
            return m
    return None


def _nvila(model):
    m = find_nvila(model)
    if m is None:
        raise TypeError(f"{type(model).__name__} contains no NVILA model (LlavaMetaForCausalLM with `llm`).")
    return m


def _image_mask(input_ids, attn_in, new_labels, attn_out, layouts, media_token_ids) -> torch.Tensor:
    names = {tid: name for name, tid in media_token_ids.items()}
    mask = torch.zeros_like(attn_out, dtype=torch.bool)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][attn_in[b]].tolist()
        sample = [layouts[names[t]].popleft() for t in ids if t in names]
        slots = ((new_labels[b] == IGNORE_INDEX) & attn_out[b]).nonzero().flatten()
        layout = torch.cat(sample) if sample else torch.zeros(0, dtype=torch.bool, device=mask.device)
        if slots.numel() > layout.numel():
            raise RuntimeError(f"vlm-preserve: {slots.numel()} media positions in sample {b} but its media objects "
                               f"cover {layout.numel()}: NVILA's _embed changed (vlm-preserve check-upstream nvila).")
        mask[b, slots] = layout[: slots.numel()].to(mask.device)  # truncation keeps a prefix of each sample
    return mask


class NVILAAdapter(Adapter):
    """NVILA's LlavaLlamaModel wrapper (`llm`, `vision_tower`, `mm_projector`)."""
    name = "nvila"

    @classmethod
    def matches(cls, model) -> bool:
        return find_nvila(model) is not None

    def model_dims(self, model) -> dict:
        vlm = _nvila(model)
        cfg = vlm.llm.config
        return {"num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                "vision_hidden_size": getattr(vlm.config, "mm_hidden_size", None)}

    def llm_modules(self, model) -> list:
        llm = _nvila(model).llm
        return [llm.model.embed_tokens, llm.model.layers, llm.model.norm, llm.lm_head]

    def projector_modules(self, model) -> list:
        return [_nvila(model).mm_projector]

    def decoder_layers(self, model):
        return _nvila(model).llm.model.layers

    def install_capture(self, model, session: CaptureSession, *, visual_features: bool = False) -> Patches:
        """Wrap NVILA's `_embed`, its encoders' `_process_features` and `repack_multimodal_data` so the captured
        forward leaves a StepCapture (packed as the LLM sees it)."""
        if visual_features:
            raise ConfigError("--pre_anchor pre_proj is not available for NVILA: its mlp_downsample projectors merge "
                              "several vision tokens into one LLM token; use --pre_anchor pre_llm.")
        vlm = _nvila(model)
        patches = Patches()
        seen = session.scratch
        layouts: dict = defaultdict(deque)

        for name, encoder in vlm.encoders.items():  # a plain dict, not submodules
            def process(features, start_token_embeds, end_token_embeds, _orig=encoder._process_features, _name=name):
                out = _orig(features, start_token_embeds, end_token_embeds)
                if seen.get("recording"):
                    def zero(e):
                        return None if e is None else torch.zeros_like(e[..., :1], dtype=torch.float32)
                    ones = torch.ones_like(features[..., :1], dtype=torch.float32)
                    layouts[_name].append(_orig(ones, zero(start_token_embeds), zero(end_token_embeds))[..., 0].bool())
                return out
            patches.setattr(encoder, "_process_features", process)

        original_embed = vlm._embed
        original_repack = vlm.repack_multimodal_data

        def embed(input_ids, media, media_config, labels, attention_mask):
            if not session.begin_forward():
                return original_embed(input_ids, media, media_config, labels, attention_mask)
            layouts.clear()
            seen["recording"] = True
            attn_in = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            marked = (labels.masked_fill(labels == IGNORE_INDEX, _SPARE) if labels is not None
                      else torch.full_like(input_ids, _SPARE))
            try:
                embeds, new_labels, attn = original_embed(input_ids, media, media_config, marked, attn_in)
            finally:
                seen["recording"] = False
            image_mask = _image_mask(input_ids, attn_in, new_labels, attn.bool(), layouts, vlm.tokenizer.media_token_ids)
            new_labels = new_labels.masked_fill(new_labels == _SPARE, IGNORE_INDEX)
            cap = StepCapture(inputs_embeds=embeds, image_mask=image_mask, attention_mask=attn.bool(), labels=new_labels)
            cap.extra.update(inputs_embeds_unpacked=embeds, image_mask_unpacked=image_mask)
            session.record(cap)
            return embeds, new_labels, attn

        def repack(inputs_embeds, attention_mask, position_ids, labels):
            out = original_repack(inputs_embeds, attention_mask, position_ids, labels)
            cap = session.current
            if cap is None or cap is not session.capture or cap.extra.get("packed"):
                return out
            packed_embeds, packed_attn, _, packed_labels = out
            rows = [cap.image_mask[b][attention_mask[b].bool()] for b in range(attention_mask.shape[0])]
            flat = torch.cat(rows)
            mask = torch.zeros(packed_attn.shape, dtype=torch.bool, device=flat.device)
            mask[0, : flat.numel()] = flat
            cap.inputs_embeds, cap.image_mask, cap.labels = packed_embeds, mask, packed_labels
            cap.attention_mask = packed_attn.bool()
            cap.extra["packed"] = True
            return out

        patches.setattr(vlm, "_embed", embed)
        patches.setattr(vlm, "repack_multimodal_data", repack)
        patches.add_hook(vlm.llm.model.register_forward_hook(session.keep_outputs))  # hidden_states
        patches.add_hook(vlm.llm.lm_head.register_forward_hook(session.keep_outputs))  # logits
        return patches
