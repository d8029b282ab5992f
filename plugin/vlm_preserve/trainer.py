"""Attach a Preserver to a `transformers.Trainer` (upstream's own subclass, TRL's SFTTrainer, yours).

The terms are added after the trainer's own `compute_loss` (so a subclass override, `compute_loss_func`
and `num_items_in_batch` normalisation keep working), logged by name next to `loss`; training-only heads
are saved in each checkpoint (`vlm_preserve_heads.safetensors`, restored on resume) and dropped from every
model save. A save is announced before it starts and marked complete once all of it is written, and
`resume_from_checkpoint=True` skips a folder announced but never marked, so a process killed mid-save never resumes
from a half-written checkpoint (checkpoints.py).
Framework-specific questions go to the adapter.
"""
from __future__ import annotations

import os

import torch

from . import checkpoints
from .attachment import Attachment, without_heads
from .config import HEADS_FILE, LossScaling
from .regularizers import SKIPPED
from .regularizers.distill import ROUTE_KEY

_SEED_PRIME, _STEP_PRIME = 1_000_003, 9_973  # the step seed's mixing (_step_seed)



def _is_dtensor(t) -> bool:
    """A parameter sharded by FSDP2 (`fully_shard`, accelerate's FSDP version 2): a DTensor holding one shard."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed
        return False
    return isinstance(t, DTensor)


def _gathered_state(module: torch.nn.Module) -> dict:
    """State dict of a small module, gathered first under DeepSpeed ZeRO-3 (partitioned params are empty) or
    FSDP2 (params are DTensor shards: `full_tensor()` all-gathers them; every rank calls this, in the same order)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: (v.full_tensor() if _is_dtensor(v) else v).detach().cpu().clone()
            for k, v in module.state_dict().items()}


def _load_full_state(module: torch.nn.Module, state: dict) -> None:
    """`module.load_state_dict(state)` for a full (gathered) state; under FSDP2 each full tensor is cut to this
    rank's shard first (load_state_dict cannot copy a plain tensor into a DTensor). Every rank read the same file,
    so no collective is needed (src_data_rank=None: each rank takes its own chunk)."""
    own = module.state_dict()
    if any(_is_dtensor(v) for v in own.values()):
        from torch.distributed.tensor import distribute_tensor
        state = {k: distribute_tensor(v.to(own[k].dtype), own[k].device_mesh, own[k].placements, src_data_rank=None)
                 if _is_dtensor(own[k]) else v for k, v in state.items()}
    module.load_state_dict(state)


class PreservingMixin:
    """Methods layered over any Trainer class by `preserving_trainer_class`."""
    _vp_scaling = LossScaling()

    def _vp_setup(self, configs: dict, adapter, teacher=None) -> None:
        self._vp = Attachment(self.model, configs, adapter, teacher=teacher)
        if len(self._vp.heads) and getattr(self, "optimizer", None) is not None:
            self._vp.detach()
            raise RuntimeError("vlm-preserve: attach before the optimizer is created (before trainer.train()), "
                               "or the new heads would not be trained.")
        self.preserver = self._vp.preserver
        self._vp_logs: dict = {}
        self._vp_micro = (-1, 0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        if not self.preserver.active:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        route = inputs.get(ROUTE_KEY)  # a per-sample distillation override: ours, never the model's input
        inputs = {k: v for k, v in inputs.items() if k != ROUTE_KEY}
        inputs.update(self._vp.forward_kwargs())
        self._vp.begin_step()
        self._vp.session.batch = inputs
        anchor = self._vp_anchor(model)
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        finally:
            if anchor is not None:
                anchor.remove()
        lm_loss, outputs = result if return_outputs else (result, None)
        loss, logs = self._vp.total_loss(lm_loss, step_seed=self._step_seed(), route=route)
        # Where the trainer does not divide by gradient accumulation (its loss is already normalised over the
        # accumulated batch), the per-micro-batch terms are divided here, so a term weighs the same either way.
        if self._vp_ga_scaled(num_items_in_batch):
            ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            # a trainer whose training_step also multiplies the loss by the world size (NVILA's) has the terms
            # divided by it too, so they weigh what they weigh under a stock Trainer
            div = ga * (self.args.world_size if self._vp_scaling.times_world_size else 1)
            # soft_label replaced the LM loss with a per-micro-batch mean: then the whole loss is divided
            loss = loss / div if self.preserver.replaces_lm_loss else lm_loss + (loss - lm_loss) / div
            # The LM loss is normalised by the tokens of the whole accumulated batch (all ranks, times the world
            # size under average_tokens_across_devices); x GA makes it a per-micro-batch value, and `log`'s mean
            # over micro-batches and ranks then gives the LM loss of the global batch, as the trainer's `loss`.
            logs["lm_loss"] = logs["lm_loss"] * ga
        self._accumulate(logs)
        if self._vp.forward_kwargs() and return_outputs:  # evaluation would otherwise collect every layer as "logits"
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k != "hidden_states"})
        return (loss, outputs) if return_outputs else loss

    def _vp_anchor(self, model):
        """Under torch DDP with find_unused_parameters (the Trainer's default without gradient checkpointing), DDP
        finds the parameters a forward used by walking back from the forward's outputs, right after it. The heads
        run later, in this loss, so DDP would mark them unused and then fail when their gradients arrive ("marked
        as ready twice"). Adding a zero computed from the heads' parameters to an output inside the forward (the
        loss, else the last hidden state PRe asks for) makes DDP expect their gradients; values and gradients are
        unchanged (x + 0 is x). New output keys cannot be used: DDP rebuilds the output class from its fields.
        Returns the hook's handle, or None where no anchor is needed."""
        if not (len(self._vp.heads) and isinstance(model, torch.nn.parallel.DistributedDataParallel)
                and model.find_unused_parameters and torch.is_grad_enabled()):
            return None
        params = [p for p in self._vp.heads.parameters() if p.requires_grad]

        def hook(module, args, output):
            if not params:
                return output
            zero = torch.stack([p.reshape(-1)[:1].sum().float() for p in params]).sum() * 0
            if getattr(output, "loss", None) is not None:
                output.loss = output.loss + zero
            elif getattr(output, "hidden_states", None) is not None:
                hs = output.hidden_states
                output.hidden_states = (*hs[:-1], hs[-1] + zero.to(hs[-1].dtype))
            return output
        return model.module.register_forward_hook(hook)

    def _vp_ga_scaled(self, num_items_in_batch) -> bool:
        """Does the trainer skip its division by gradient-accumulation steps? As declared, else as transformers
        decides."""
        if self._vp_scaling.divides_by_ga is not None:
            return not self._vp_scaling.divides_by_ga
        return ((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(self, "compute_loss_func", None) is not None)

    def _step_seed(self) -> int:
        step, micro = self._vp_micro
        micro = micro + 1 if step == self.state.global_step else 0
        self._vp_micro = (self.state.global_step, micro)
        # a distinct seed per (run seed, step, micro-batch), the same on every rank and after a resume: the
        # multipliers are primes larger than any micro-batch count and step count they separate
        return (int(self.args.seed) * _SEED_PRIME + self.state.global_step * _STEP_PRIME + micro) % (2 ** 62)

    def _accumulate(self, logs: dict) -> None:
        for name, value in logs.items():
            if name.endswith(SKIPPED):  # a running count: its latest value, not a mean over the micro-batches
                self._vp_logs[name] = (value.detach().float(), 1)
                continue
            s, c = self._vp_logs.get(name, (0.0, 0))
            if value is not None:
                s, c = s + value.detach().float(), c + 1
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
        if len(self._vp.heads):
            state_dict = without_heads(self.model.state_dict() if state_dict is None else state_dict)
        return super()._save(output_dir, state_dict=state_dict)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
        run_dir = self._get_output_dir(trial=trial)
        out = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            checkpoints.begin(out)
        self.accelerator.wait_for_everyone()
        # upstream rotates inside its save: a kill after that but before the heads and the marker would leave no
        # complete checkpoint at all, so rotation waits until this one is marked
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            result = super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self.args.save_total_limit = limit
        if len(self._vp.heads):
            from safetensors.torch import save_file
            state = _gathered_state(self._vp.heads)
            if self.args.should_save:
                os.makedirs(out, exist_ok=True)
                save_file(state, os.path.join(out, HEADS_FILE + ".tmp"), metadata={"format": "pt"})
                os.replace(os.path.join(out, HEADS_FILE + ".tmp"), os.path.join(out, HEADS_FILE))
        self.accelerator.wait_for_everyone()  # every rank's files (RNG state, ZeRO shards) are written
        if self.args.should_save:
            checkpoints.mark_complete(out)
            self._vp_rotate(run_dir)
        return result

    def _vp_rotate(self, run_dir: str) -> None:
        try:
            from transformers.trainer_utils import rotate_checkpoints  # transformers 5
        except ImportError:
            return self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            found, cut = checkpoints.latest_complete(self.args.output_dir)
            for path in cut:
                print(checkpoints.cut_line(path), flush=True)
            if found is None and cut:
                print(f"[vlm-preserve] no complete checkpoint in {self.args.output_dir}: training starts at step 0",
                      flush=True)
            elif found is not None:
                print(f"[vlm-preserve] resuming from {found}", flush=True)
            # none at all: upstream's own error for resume_from_checkpoint=True without checkpoints
            resume_from_checkpoint = found if (found or cut) else True
        elif isinstance(resume_from_checkpoint, str) and checkpoints.is_cut(resume_from_checkpoint):
            print(f"[vlm-preserve] warning: resuming from {resume_from_checkpoint} as asked, though its write was "
                  "cut", flush=True)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        result = super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, HEADS_FILE)
        if len(self._vp.heads):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path} is missing: the checkpoint was not written with these regularizers "
                    f"({','.join(self.preserver.names)}), so their heads cannot be restored. "
                    "Resume with the regularizers it was trained with, or start a new output_dir.")
            from safetensors.torch import load_file
            _load_full_state(self._vp.heads, load_file(path, device="cpu"))
        return result


def preserving_trainer_class(base: type, configs: dict, adapter=None, teacher=None,
                             scaling: LossScaling = LossScaling()) -> type:
    """A subclass of `base` (a transformers.Trainer) whose instances attach the configured terms at init
    (the adapter, if not given, is chosen from the model the trainer receives); `scaling`: what `base` does to
    the loss (default: as transformers' Trainer)."""

    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        # After upstream has set requires_grad and the Trainer has seeded torch, before the optimizer exists:
        # the heads are trainable, deterministic, and optimised.
        from .adapters import resolve_adapter
        self._vp_setup(configs, resolve_adapter(self.model, adapter), teacher)

    name = f"Preserving{base.__name__}"
    return type(name, (PreservingMixin, base), {"__init__": __init__, "__qualname__": name, "_vp_scaling": scaling})
