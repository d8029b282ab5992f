"""Registry of the methods and `Preserver`, the enabled set for one run.

Framework-free: an adapter builds a `StepCapture`, the Preserver turns (LM loss, capture) into the
total loss and the named terms to log.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..capture import StepCapture
from ..config import HEADS_PREFIX, ConfigError, PreserveArguments
from .attention_tuning import apply_attention_tuning
from .distill import Distill, DistillConfig
from .pre import PRe, PReConfig
from .rdd import RDD, RDDConfig
from .soft_label import SoftLabel, SoftLabelConfig

# name -> config dataclass whose fields belong to it (None: no options)
METHODS = {"rdd": RDDConfig, "pre": PReConfig, "distill": DistillConfig, "soft_label": SoftLabelConfig,
           "attention_tuning": None}
CONFIG_CLASSES = (PreserveArguments, RDDConfig, PReConfig, DistillConfig, SoftLabelConfig)


def parse_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    for n in names:
        if n not in METHODS:
            raise ConfigError(f"--regularizer: unknown term {n!r}; choose from: none, {', '.join(METHODS)} "
                              f"(combine with commas, e.g. rdd,pre).")
    if len(set(names)) != len(names):
        raise ConfigError(f"--regularizer {spec!r} names a term twice.")
    return names


def validate(configs: dict, given: set[str] | None = None) -> list[str]:
    """Check every config; refuse options of a term that is not enabled.

    `configs` maps dataclass type -> instance; `given` is the set of flags the user passed (the CLI knows
    it); without it, a field differing from its default counts as given."""
    names = parse_names(configs[PreserveArguments].regularizer)
    for method, cls in METHODS.items():
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
    """The enabled terms of one run, built for a model of the given shape."""

    def __init__(self, configs: dict, *, num_layers: int, hidden_size: int, vision_hidden_size: int | None = None):
        self.names = validate(configs)
        self.terms = []
        self.heads = nn.ModuleDict()
        self.attention_tuning = "attention_tuning" in self.names
        self.distill = None  # the Distill term; the Attachment gives it its teacher
        for n in self.names:
            if n == "rdd":
                self.terms.append(RDD(configs[RDDConfig]))
            elif n == "pre":
                t = PRe(configs[PReConfig], num_layers, hidden_size, vision_hidden_size or hidden_size)
                self.heads["pre"] = t.head
                self.terms.append(t)
            elif n == "distill":
                self.distill = Distill(configs[DistillConfig], num_layers)
                self.terms.append(self.distill)
            elif n == "soft_label":
                self.terms.append(SoftLabel(configs[SoftLabelConfig]))
        self.hidden_layers = sorted({k for t in self.terms for k in t.hidden_layers})
        self.needs_visual_features = any(getattr(t, "needs_visual_features", False) for t in self.terms)
        self.replaces_lm_loss = any(getattr(t, "replaces_lm_loss", False) for t in self.terms)

    @property
    def active(self) -> bool:
        return bool(self.names)

    def apply_attention_tuning(self, llm_modules, projector_modules) -> dict:
        return apply_attention_tuning(llm_modules, projector_modules) if self.attention_tuning else {}

    def total_loss(self, lm_loss: torch.Tensor, cap: StepCapture) -> tuple[torch.Tensor, dict]:
        """total = (LM loss, or its soft-label replacement) + Σ weight·term; terms returned detached,
        None where a batch had nothing to measure (its term then entered with weight 0)."""
        logs = {"lm_loss": lm_loss.detach()}
        base, extra = lm_loss, 0.0
        for t in self.terms:
            value, valid = t.loss(cap)
            logs[f"{t.name}_loss"] = value.detach() if valid else None
            if getattr(t, "replaces_lm_loss", False):
                base = value
            else:
                extra = extra + value.to(lm_loss.dtype) * (t.weight if valid else 0.0)
        total = base + extra
        return total, logs


__all__ = ["METHODS", "CONFIG_CLASSES", "HEADS_PREFIX", "Preserver", "parse_names", "validate",
           "RDDConfig", "PReConfig", "DistillConfig", "SoftLabelConfig", "PreserveArguments"]
