"""LLaVA-architecture codebases: upstream LLaVA (haotian-liu/LLaVA, PyPI `llava-torch`, pinned in
third_party/llava) and Bunny (BAAI-DCAI/Bunny, third_party/bunny), whose models share the
`prepare_inputs_labels_for_multimodal` / `get_model().mm_projector` interface. Every symbol touched is
declared in upstream_symbols/<upstream>/symbols.json.

Image positions and token ids: upstream's `prepare_inputs_labels_for_multimodal` returns neither an image
mask nor the token ids of the sequence it builds (only embeddings). Upstream carries the labels through
untouched, cut and padded exactly like the embeddings, so we pass it labels that encode (token id, label)
as one non-negative integer, `id·S + (label + 1 or 0 if ignored)`. Afterwards the only -100 labels among
attended positions are the freshly inserted image slots, and decoding gives back the labels and the token
id at every text position. Same forward, no second pass.
"""
from __future__ import annotations

import torch

from ..capture import CaptureSession, StepCapture
from ..config import IGNORE_INDEX
from ..patching import Patches
from .base import Adapter

IMAGE_TOKEN_INDEX = -200   # llava.constants.IMAGE_TOKEN_INDEX


def find_llava(model):
    """The upstream LlavaMetaForCausalLM inside any wrapper (PEFT, DeepSpeed, DDP); None where there is none."""
    for m in model.modules():
        if hasattr(type(m), "prepare_inputs_labels_for_multimodal") and hasattr(type(m), "get_model"):
            return m
    return None


def _llava(model):
    m = find_llava(model)
    if m is None:
        raise TypeError(f"{type(model).__name__} contains no upstream LLaVA model (LlavaMetaForCausalLM).")
    return m


def features_in_mask_order(features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           image_mask: torch.Tensor) -> torch.Tensor:
    """Rows of the projector input (n_images, N, d_v) in the order of the image positions.

    Upstream pairs each text-only sample with a dummy image it then cuts away, inserts every image of a
    sample whole, and truncation keeps a prefix of each sample, hence a prefix of its visual rows."""
    rows, img = [], 0
    for b in range(input_ids.shape[0]):
        n_img = int((input_ids[b][attention_mask[b]] == IMAGE_TOKEN_INDEX).sum())
        if n_img == 0:
            img += 1
            continue
        f = features[img:img + n_img].reshape(-1, features.shape[-1])
        img += n_img
        rows.append(f[: int(image_mask[b].sum())])
    out = torch.cat(rows) if rows else features.new_zeros(0, features.shape[-1])
    if out.shape[0] != int(image_mask.sum()):
        raise RuntimeError(f"vlm-preserve: {int(image_mask.sum())} image positions but {out.shape[0]} vision-tower "
                           "rows; pre_anchor=pre_proj needs one projector output token per vision token.")
    return out


class LlavaAdapter(Adapter):
    """Upstream LLaVA and Bunny models (LlavaMetaForCausalLM)."""
    name = "llava"

    @classmethod
    def matches(cls, model) -> bool:
        return find_llava(model) is not None

    def model_dims(self, model) -> dict:
        cfg = _llava(model).config
        return {"num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                "vision_hidden_size": getattr(cfg, "mm_hidden_size", None)}

    def decoder_layers(self, model):
        return _llava(model).get_model().layers

    def llm_modules(self, model) -> list:
        llava = _llava(model)
        inner = llava.get_model()
        norm = getattr(inner, "norm", None) or getattr(inner, "final_layernorm", None)  # Bunny's Phi: final_layernorm
        return [m for m in (inner.embed_tokens, inner.layers, norm, llava.lm_head) if m is not None]

    def projector_modules(self, model) -> list:
        return [_llava(model).get_model().mm_projector]

    def install_capture(self, model, session: CaptureSession, *, visual_features: bool = False) -> Patches:
        """Wrap the model's multimodal input preparation so the captured forward leaves a StepCapture."""
        llava = _llava(model)
        patches = Patches()
        original = llava.prepare_inputs_labels_for_multimodal
        seen = session.scratch
        if visual_features:
            def keep_input(module, args):
                seen["x"] = args[0]
            patches.add_hook(llava.get_model().mm_projector.register_forward_pre_hook(keep_input))

        def prepare(input_ids, position_ids, attention_mask, past_key_values, labels, images, *rest):
            # *rest: LLaVA's image_sizes; Bunny's signature ends at images. The projector's input hook runs inside
            # `original`, after this point, so the scratch is cleared before it fills.
            if not session.begin_forward():
                return original(input_ids, position_ids, attention_mask, past_key_values, labels, images, *rest)
            ids = input_ids.clone()  # kept for feature ordering (Bunny's variant mutates input_ids)
            attn_in = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            code = torch.zeros_like(input_ids) if labels is None else (labels + 1).clamp(min=0)
            span = int(code.max()) + 1
            encoded = input_ids.clamp(min=0) * span + code
            out_ids, pos, attn, pkv, embeds, encoded = original(
                input_ids, position_ids, attn_in, past_key_values, encoded, images, *rest)
            if embeds is None:  # upstream's text-only early return: hand back exactly what it was given
                return out_ids, pos, attention_mask, pkv, None, labels
            attn_b = attn.bool()
            real = encoded >= 0  # not an inserted image slot, not padding
            image_mask = ~real & attn_b
            label = encoded % span - 1
            new_labels = torch.where(real & (label >= 0), label, IGNORE_INDEX)
            token_ids = torch.where(real, encoded // span, -1)
            feats = None
            if visual_features:
                x = seen.get("x")
                if x is None or x.ndim != 3 or not torch.is_tensor(images) or images.ndim != 4:
                    raise RuntimeError("vlm-preserve: pre_anchor=pre_proj supports batches of single images "
                                       "(image_aspect_ratio pad/square); use --pre_anchor pre_llm for anyres.")
                feats = features_in_mask_order(x, ids, attn_in.bool(), image_mask)
            session.record(StepCapture(inputs_embeds=embeds, image_mask=image_mask, attention_mask=attn_b,
                                       labels=new_labels, visual_features=feats, input_ids=token_ids))
            return (out_ids, pos, attn if attention_mask is not None else None, pkv, embeds,
                    new_labels if labels is not None else None)

        patches.setattr(llava, "prepare_inputs_labels_for_multimodal", prepare)
        patches.add_hook(llava.get_model().register_forward_hook(session.keep_outputs))  # hidden_states
        # logits from the LM head module: PEFT calls the model's forward directly, bypassing its hooks
        patches.add_hook(llava.lm_head.register_forward_hook(session.keep_outputs))
        return patches


def install_route_field(patches: Patches, data_module, field: str) -> None:
    """Carry each sample's distillation override (data json `field`: true/false) into the batch as
    `vlm_preserve_distill` (1, 0, or -1 where the sample has no such field: follow the rule)."""
    from ..regularizers.distill import ROUTE_KEY
    dataset, collator = data_module.LazySupervisedDataset, data_module.DataCollatorForSupervisedDataset
    get_item, collate = dataset.__getitem__, collator.__call__

    def __getitem__(self, i):
        item = get_item(self, i)
        value = self.list_data_dict[i].get(field)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"vlm-preserve: sample {i} of the data json has {field!r}: {value!r}; expected true or "
                             f"false (or no such field, to follow --distill_route).")
        item[ROUTE_KEY] = -1 if value is None else int(value)
        return item

    def __call__(self, instances):
        batch = collate(self, instances)
        batch[ROUTE_KEY] = torch.tensor([inst.get(ROUTE_KEY, -1) for inst in instances])
        return batch

    patches.setattr(dataset, "__getitem__", __getitem__)
    patches.setattr(collator, "__call__", __call__)
