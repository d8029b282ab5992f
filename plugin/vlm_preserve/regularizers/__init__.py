"""The methods (one class each, registered by name in `base.REGISTRY`) and `Preserver`, the enabled set for one run.

Framework-free: an adapter builds a `StepCapture`, the Preserver turns (LM loss, capture) into the
total loss and the named terms to log. How to add a method: docs/architecture.md.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..capture import StepCapture
from ..config import HEADS_PREFIX, NONFINITE, ConfigError, NonFiniteTermError, PreserveArguments, choice
# importing the built-in methods registers them, in this order (the order of --help and of error messages)
from .base import REGISTRY, Method, ModelDims, SetupContext, method_class, register
from .rdd import RDD, RDDConfig
from .pre import PRe, PReConfig
from .distill import Distill, DistillConfig
from .soft_label import SoftLabel, SoftLabelConfig
from .dft import DFT
from .attention_tuning import AttentionTuning


def config_classes() -> tuple:
    """PreserveArguments and every registered method's config class: the dataclasses the CLI flags come from."""
    return (PreserveArguments,) + tuple(c.config_class for c in REGISTRY.values() if c.config_class is not None)


def parse_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    for n in names:
        method_class(n)
    if len(set(names)) != len(names):
        raise ConfigError(f"--regularizer {spec!r} names a term twice.")
    return names


def validate(configs: dict, given: set[str] | None = None) -> list[str]:
    """Check every config; refuse options of a term that is not enabled.

    `configs` maps dataclass type -> instance; `given` is the set of flags the user passed (the CLI knows
    it); without it, a field differing from its default counts as given."""
    names = parse_names(configs[PreserveArguments].regularizer)
    replacing = [n for n in names if REGISTRY[n].replaces_lm_loss]
    if len(replacing) > 1:
        raise ConfigError(f"--regularizer {configs[PreserveArguments].regularizer}: {' and '.join(replacing)} each "
                          "replace the LM loss; enable one of them.")
    choice("--nonfinite_terms", configs[PreserveArguments].nonfinite_terms, NONFINITE)
    for method, m in REGISTRY.items():
        cls = m.config_class
        if cls is None:
            continue
        cfg = configs.get(cls) or cls()  # absent: its defaults
        if method in names:
            cfg.validate()
            continue
        for f in dataclasses.fields(cls):
            passed = (f.name in given) if given is not None else getattr(cfg, f.name) != f.default
            if passed:
                raise ConfigError(f"--{f.name} was given but {method!r} is not enabled "
                                  f"(--regularizer {configs[PreserveArguments].regularizer}); "
                                  f"add {method} to --regularizer or drop the option.")
    return names


class Preserver:
    """The enabled methods of one run, built for a model of the given shape."""

    def __init__(self, configs: dict, *, num_layers: int, hidden_size: int, vision_hidden_size: int | None = None):
        self.names = validate(configs)
        dims = ModelDims(num_layers, hidden_size, vision_hidden_size or hidden_size)
        self.methods: list[Method] = []
        for n in self.names:
            cls = REGISTRY[n]
            cfg = (configs.get(cls.config_class) or cls.config_class()) if cls.config_class is not None else None
            self.methods.append(cls(cfg, dims))
        self.terms = [m for m in self.methods if m.has_loss]
        # keyed by method name: the heads' parameter names in checkpoints are vlm_preserve_heads.<name>.*
        self.heads = nn.ModuleDict({m.name: m.heads for m in self.methods if m.heads is not None})
        self.hidden_layers = sorted({k for t in self.terms for k in t.hidden_layers})
        self.needs_visual_features = any(t.needs_visual_features for t in self.terms)
        self.replaces_lm_loss = any(t.replaces_lm_loss for t in self.terms)
        self.on_nonfinite = configs[PreserveArguments].nonfinite_terms
        self.skipped = {t.name: 0 for t in self.terms}

    @property
    def active(self) -> bool:
        return bool(self.names)

    def method(self, name: str) -> Method | None:
        return next((m for m in self.methods if m.name == name), None)

    def total_loss(self, lm_loss: torch.Tensor, cap: StepCapture) -> tuple[torch.Tensor, dict]:
        """total = (LM loss, or its soft-label replacement) + Σ weight·term; terms returned detached,
        None where a batch had nothing to measure (its term then entered with weight 0)."""
        logs = {"lm_loss": lm_loss.detach()}
        base, extra = lm_loss, 0.0
        values = [t.loss(cap) for t in self.terms]
        for t, (value, valid), bad in zip(self.terms, values, _nonfinite([v for v, _ in values])):
            if bad:
                # A NaN/inf term times 0 still sends NaN into the weights (0 · inf in its backward), so the term's
                # graph is dropped; the placeholder keeps its heads in this step's backward on every rank.
                if self.on_nonfinite == "raise":
                    raise NonFiniteTermError(
                        f"vlm-preserve: the {t.name} term is {value.detach().float().item()} at this step (NaN or "
                        "infinite on at least one rank). Look for an all-padding visual batch or fp16 overflow; "
                        "--nonfinite_terms skip leaves such a step's term out instead.")
                self.skipped[t.name] += 1
                logs[f"{t.name}_loss"] = None
                logs[f"{t.name}{SKIPPED}"] = torch.tensor(float(self.skipped[t.name]))
                extra = extra + t.placeholder(cap).to(lm_loss.dtype) * 0.0
                continue
            logs[f"{t.name}_loss"] = value.detach() if valid else None
            if self.skipped[t.name]:
                logs[f"{t.name}{SKIPPED}"] = torch.tensor(float(self.skipped[t.name]))
            if t.replaces_lm_loss:
                base = value
            else:
                extra = extra + value.to(lm_loss.dtype) * (t.weight if valid else 0.0)
        total = base + extra
        return total, logs


SKIPPED = "_skipped_steps"  # a log key's suffix: how many steps a term was left out, so far (a count, not a mean)


def _nonfinite(values: list) -> list[bool]:
    """Per value: NaN or infinite on any rank (one all-reduce), so every rank skips or raises alike."""
    if not values:
        return []
    flags = torch.stack([(~torch.isfinite(v.detach())).any() for v in values]).float()
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


__all__ = ["REGISTRY", "Method", "ModelDims", "SetupContext", "register", "config_classes", "HEADS_PREFIX",
           "Preserver", "parse_names", "validate", "RDD", "PRe", "Distill", "SoftLabel", "DFT", "AttentionTuning",
           "RDDConfig", "PReConfig", "DistillConfig", "SoftLabelConfig", "PreserveArguments"]
