"""Custom VLMs: the user names the modules and how image positions are marked.

    GenericAdapter(embed="model.embed_tokens", projector="model.mm_projector", layers="model.layers",
                   image_token_id=32000)          # or image_mask_key="image_mask": a bool (B, L) in the batch

The decoder's input is read by a forward pre-hook on the first decoder layer (only its first call in a
forward counts, so reentrant checkpointing's recompute is ignored); the image mask must align with that
sequence. PRe reads `outputs["hidden_states"]`, so the model must honour `output_hidden_states=True`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..capture import CaptureSession, StepCapture
from ..config import ConfigError
from ..patching import Patches
from .base import Adapter


def resolve(model, path: str):
    obj = model
    walked = []
    for part in path.split("."):
        nxt = getattr(obj, part, None)
        if not isinstance(nxt, torch.nn.Module):
            children = ", ".join(n for n, _ in obj.named_children()) or "(no submodules)"
            where = ".".join(walked) or type(model).__name__
            raise ConfigError(f"module path {path!r}: {where} has no submodule {part!r}; it has: {children}.")
        obj = nxt
        walked.append(part)
    return obj


@dataclass
class GenericAdapter(Adapter):
    name = "generic"
    embed: str
    projector: str
    layers: str
    image_token_id: Optional[int] = None
    image_mask_key: Optional[str] = None
    norm: Optional[str] = None
    lm_head: Optional[str] = None

    def __post_init__(self):
        if (self.image_token_id is None) == (self.image_mask_key is None):
            raise ConfigError("GenericAdapter: give exactly one of image_token_id (image positions are that token "
                              "in input_ids) or image_mask_key (a boolean (batch, seq) mask passed in the batch).")

    def check(self, model) -> None:
        for path in (self.embed, self.projector, self.layers, self.norm, self.lm_head):
            if path:
                resolve(model, path)
        if not hasattr(resolve(model, self.layers), "__len__"):
            raise ConfigError(f"layers={self.layers!r} is not a list of decoder layers (ModuleList).")

    def model_dims(self, model) -> dict:
        self.check(model)
        emb = resolve(model, self.embed)
        first = next((m for m in resolve(model, self.projector).modules() if isinstance(m, torch.nn.Linear)), None)
        return {"num_layers": len(resolve(model, self.layers)), "hidden_size": emb.weight.shape[1],
                "vision_hidden_size": first.in_features if first is not None else None}

    def decoder_layers(self, model):
        return resolve(model, self.layers)

    def llm_modules(self, model) -> list:
        return [resolve(model, p) for p in (self.embed, self.layers, self.norm, self.lm_head) if p]

    def projector_modules(self, model) -> list:
        return [resolve(model, self.projector)]

    def install_capture(self, model, session: CaptureSession, *, visual_features: bool = False) -> Patches:
        self.check(model)
        patches, seen = Patches(), session.scratch
        key = self.image_mask_key

        def on_model(module, args, kwargs):
            session.begin_forward()
            if key is not None:
                if key not in kwargs:
                    raise RuntimeError(f"vlm-preserve: the batch has no {key!r} (GenericAdapter.image_mask_key).")
                seen["mask"] = kwargs.pop(key)  # the model's own forward does not take it
            seen["input_ids"] = kwargs.get("input_ids", args[0] if args else None)
            seen["attention_mask"] = kwargs.get("attention_mask")
            seen["labels"] = kwargs.get("labels")
            return args, kwargs

        def on_projector(module, args):
            seen.setdefault("features", args[0])

        def on_first_layer(module, args, kwargs):
            if not session.capturing:
                return  # a checkpoint recompute, or a second pass: the first call is the step's input
            hidden = args[0] if args else kwargs["hidden_states"]
            if key is not None:
                mask = seen["mask"].bool()
            else:
                ids = seen.get("input_ids")
                if ids is None:
                    raise RuntimeError("vlm-preserve: image_token_id needs input_ids in the model call.")
                mask = ids == self.image_token_id
            if mask.shape != hidden.shape[:2]:
                raise RuntimeError(f"vlm-preserve: image mask {tuple(mask.shape)} does not align with the decoder "
                                   f"input {tuple(hidden.shape[:2])}; if the model changes the sequence length "
                                   "when inserting images, pass a mask of the final sequence via image_mask_key.")
            attn = seen.get("attention_mask")
            attn = torch.ones_like(mask) if attn is None or attn.shape != mask.shape else attn.bool()
            feats = None
            if visual_features:
                x = seen.get("features")
                if x is None and bool((mask & attn).any()):
                    raise RuntimeError(f"vlm-preserve: image positions but the projector ({self.projector}) did not run.")
                feats = hidden.new_zeros(0, 1) if x is None else x.reshape(-1, x.shape[-1])
                if x is not None and feats.shape[0] != int((mask & attn).sum()):
                    raise RuntimeError(f"vlm-preserve: {int((mask & attn).sum())} image positions but "
                                       f"{feats.shape[0]} projector input rows; pre_anchor=pre_proj cannot pair them.")
            ids = seen.get("input_ids")
            ids = ids.masked_fill(mask, -1) if torch.is_tensor(ids) and ids.shape == mask.shape else None
            session.record(StepCapture(inputs_embeds=hidden, image_mask=mask & attn, attention_mask=attn,
                                       labels=seen.get("labels"), visual_features=feats, input_ids=ids))

        patches.add_hook(model.register_forward_pre_hook(on_model, with_kwargs=True))
        patches.add_hook(model.register_forward_hook(session.keep_outputs))
        patches.add_hook(resolve(model, self.layers)[0].register_forward_pre_hook(on_first_layer, with_kwargs=True))
        if visual_features:
            patches.add_hook(resolve(model, self.projector).register_forward_pre_hook(on_projector))
        return patches
