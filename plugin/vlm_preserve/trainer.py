"""Attach a Preserver to a `transformers.Trainer` subclass (upstream's own, e.g. LLaVATrainer).

Adds the terms in `compute_loss`, logs them by name next to upstream's `loss`, keeps training-only heads
in Trainer checkpoints (`vlm_preserve_heads.safetensors`, restored on resume) and out of every model
save (final export, LoRA `non_lora_trainables.bin`, projector-only saves). Framework-specific questions
(where the capture comes from, which parameters are the LLM) go to the adapter.
"""
from __future__ import annotations

import os

import torch

from .regularizers import HEADS_PREFIX, Preserver

HEADS_FILE = "vlm_preserve_heads.safetensors"


def is_head_key(name: str) -> bool:
    return name.startswith(HEADS_PREFIX + ".") or f".{HEADS_PREFIX}." in name


def without_heads(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not is_head_key(k)}


def _gathered_state(module: torch.nn.Module) -> dict:
    """State dict of a small module, gathered first under DeepSpeed ZeRO-3 (partitioned params are empty)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class _Slot:
    """Where the adapter's capture lands during one forward."""
    def __init__(self):
        self.capture = None


def preserving_trainer_class(base: type, configs: dict, adapter) -> type:
    """A subclass of `base` (a transformers.Trainer) with the configured terms attached."""

    class PreservingTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            dims = adapter.model_dims(self.model)
            # Built here, after upstream has set requires_grad and the Trainer has seeded torch:
            # the heads are trainable, deterministic, and exist before the optimizer is created.
            self.preserver = Preserver(configs, **dims)
            if len(self.preserver.heads):
                emb = self.model.get_input_embeddings().weight
                self.preserver.heads.to(device=emb.device, dtype=emb.dtype)
                self.model.add_module(HEADS_PREFIX, self.preserver.heads)
            self.preserver.apply_attention_tuning(self.model.named_parameters(), adapter.is_llm_param,
                                                  adapter.is_projector_param)
            self._vp_slot = _Slot()
            self._vp_patches = adapter.install_capture(self.model, self._vp_slot,
                                                       visual_features=self.preserver.needs_visual_features)
            self._vp_logs: dict = {}
            self._vp_micro = (-1, 0)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            self._vp_slot.capture = None
            want_hidden = bool(self.preserver.hidden_layers)
            if want_hidden:
                inputs = {**inputs, "output_hidden_states": True}
            outputs = model(**inputs)
            lm_loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
            cap = self._vp_slot.capture
            if cap is None:
                raise RuntimeError("vlm-preserve: the model's forward did not go through the multimodal input "
                                   "preparation (no images in the batch?), so there is nothing to regularize.")
            if want_hidden:
                cap.hidden_states = outputs["hidden_states"]
            if self.preserver.needs_logits:
                cap.logits = outputs["logits"]
            cap.step_seed = self._step_seed()
            loss, logs = self.preserver.total_loss(lm_loss, cap)
            self._accumulate(logs)
            self._vp_slot.capture = None
            if want_hidden and return_outputs:  # eval would otherwise collect every layer as "logits"
                outputs = type(outputs)(**{k: v for k, v in outputs.items() if k != "hidden_states"})
            return (loss, outputs) if return_outputs else loss

        def _step_seed(self) -> int:
            step, micro = self._vp_micro
            micro = micro + 1 if step == self.state.global_step else 0
            self._vp_micro = (self.state.global_step, micro)
            return (int(self.args.seed) * 1_000_003 + self.state.global_step * 9_973 + micro) % (2 ** 62)

        def _accumulate(self, logs: dict) -> None:
            for name, value in logs.items():
                s, c = self._vp_logs.get(name, (0.0, 0))
                if value is not None:
                    s, c = s + value.float(), c + 1
                self._vp_logs[name] = (s, c)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._vp_logs:
                names = sorted(self._vp_logs)
                dev = self.args.device
                sums = torch.stack([torch.as_tensor(self._vp_logs[n][0], dtype=torch.float32, device=dev) for n in names])
                counts = torch.tensor([self._vp_logs[n][1] for n in names], dtype=torch.float32, device=dev)
                if self.args.world_size > 1:  # every rank logs the same names at the same step
                    sums, counts = self.accelerator.reduce(sums, "sum"), self.accelerator.reduce(counts, "sum")
                for n, s, c in zip(names, sums.tolist(), counts.tolist()):
                    if c > 0:
                        logs[n] = s / c
                self._vp_logs = {}
            return super().log(logs, *args, **kwargs)

        def _save(self, output_dir=None, state_dict=None):
            if len(self.preserver.heads):
                state_dict = without_heads(self.model.state_dict() if state_dict is None else state_dict)
            return super()._save(output_dir, state_dict=state_dict)

        def _save_checkpoint(self, model, trial, metrics=None):
            result = super()._save_checkpoint(model, trial, metrics)
            if len(self.preserver.heads):
                from safetensors.torch import save_file
                from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
                state = _gathered_state(self.preserver.heads)
                out = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
                if self.args.should_save:
                    os.makedirs(out, exist_ok=True)
                    save_file(state, os.path.join(out, HEADS_FILE + ".tmp"), metadata={"format": "pt"})
                    os.replace(os.path.join(out, HEADS_FILE + ".tmp"), os.path.join(out, HEADS_FILE))
            return result

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            result = super()._load_from_checkpoint(resume_from_checkpoint, model)
            path = os.path.join(resume_from_checkpoint, HEADS_FILE)
            if len(self.preserver.heads):
                if not os.path.exists(path):
                    raise FileNotFoundError(
                        f"{path} is missing: the checkpoint was not written with these regularizers "
                        f"({','.join(self.preserver.names)}), so their heads cannot be restored. "
                        "Resume with the regularizers it was trained with, or start a new output_dir.")
                from safetensors.torch import load_file
                self.preserver.heads.load_state_dict(load_file(path, device="cpu"))
            return result

    PreservingTrainer.__name__ = PreservingTrainer.__qualname__ = f"Preserving{base.__name__}"
    return PreservingTrainer
