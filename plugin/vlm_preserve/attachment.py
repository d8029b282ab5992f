"""Attach the regularizers to a model: the framework-free core every integration goes through.

    att = Attachment(model, configs, adapter)        # heads added, capture installed
    out = model(**batch, **att.forward_kwargs())
    loss, logs = att.total_loss(out["loss"], out)
    att.detach()                                       # model back as it was

Training-only heads live under `model.vlm_preserve_heads` (so optimizers, DeepSpeed and DDP see them) and
are dropped from `model.save_pretrained` while attached. The distillation teacher is never a submodule: it is
held by its term, so it is in no state dict, optimizer or checkpoint.
"""
from __future__ import annotations

import torch

from .capture import CaptureSession
from .patching import Patches
from .regularizers import HEADS_PREFIX, Preserver, SetupContext


def is_head_key(name: str) -> bool:
    return name.startswith(HEADS_PREFIX + ".") or f".{HEADS_PREFIX}." in name


def without_heads(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not is_head_key(k)}


class Attachment:
    def __init__(self, model: torch.nn.Module, configs: dict, adapter, teacher: torch.nn.Module | None = None):
        """`teacher`: a loaded module for the methods that need one (distill's original LLM; else it is loaded
        from --distill_teacher)."""
        self.preserver = Preserver(configs, **adapter.model_dims(model))
        self.patches = Patches()
        self.session = CaptureSession()
        if not self.preserver.active:  # "none": nothing installed, the model runs exactly as without the plugin
            return
        heads = self.preserver.heads
        if len(heads):
            ref = next(adapter.llm_modules(model)[0].parameters())  # the embedding: the LLM's dtype and device
            heads.to(device=ref.device, dtype=ref.dtype)
            model.add_module(HEADS_PREFIX, heads)
            self.patches.call_on_undo(lambda: delattr(model, HEADS_PREFIX))
            original_save = getattr(model, "save_pretrained", None)
            if original_save is not None:
                def save_pretrained(*args, state_dict=None, **kwargs):
                    return original_save(*args, state_dict=without_heads(state_dict if state_dict is not None
                                                                         else model.state_dict()), **kwargs)
                self.patches.setattr(model, "save_pretrained", save_pretrained)
        capture = adapter.install_capture(model, self.session, visual_features=self.preserver.needs_visual_features)
        self.patches.call_on_undo(capture.undo)
        ctx = SetupContext(model, adapter, self.patches, lambda: self.session.capture, teacher)
        try:
            for m in self.preserver.methods:
                m.setup(ctx)
        except Exception:  # nothing half-attached: undo what the earlier steps installed
            self.patches.undo()
            raise

    @property
    def heads(self) -> torch.nn.ModuleDict:
        return self.preserver.heads

    def forward_kwargs(self) -> dict:
        return {"output_hidden_states": True} if self.preserver.hidden_layers else {}

    def begin_step(self) -> None:
        """Forget any capture: the next forward of the model is the one the terms are computed from."""
        self.session.begin_step()

    def total_loss(self, lm_loss: torch.Tensor, outputs=None, step_seed: int = 0,
                   route=None) -> tuple[torch.Tensor, dict]:
        """LM loss + weighted terms from the first forward since the last call; returns (total, raw terms).
        `route`: the batch's per-sample distillation override ((B,): 1 distil, 0 never, -1 rule), if any.

        Hidden states and logits come from the capture (the adapter hooks the modules that produce them),
        so trainers whose loss path runs extra forwards (TRL's metrics pass) still use the gradient-carrying one."""
        if not self.preserver.active:
            return lm_loss, {}
        cap = self.session.take()
        if cap is None:
            raise RuntimeError("vlm-preserve: the last forward left no capture (no image input reached the model's "
                               "multimodal path, or the model was called outside the attached module).")
        if outputs is not None:
            cap.take_outputs(outputs)
        if self.preserver.hidden_layers and cap.hidden_states is None:
            raise RuntimeError("vlm-preserve: PRe needs the model's hidden_states; call the model with "
                               "output_hidden_states=True (Attachment.forward_kwargs()).")
        cap.step_seed = step_seed
        if route is not None:
            cap.extra["route"] = route
        return self.preserver.total_loss(lm_loss, cap)

    def detach(self) -> None:
        self.patches.undo()
