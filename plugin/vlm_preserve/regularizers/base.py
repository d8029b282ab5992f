"""The contract of a preservation method, and the registry that every other part reads its methods from.

A method is one class, registered by name:

    @register
    class MyTerm(Method):
        name = "my_term"                  # the --regularizer name
        config_class = MyTermConfig       # its flags, a dataclass with `validate()` (None: no options)

        def __init__(self, cfg, dims):    # dims: the model's ModelDims
            super().__init__(cfg, dims)
            self.weight = cfg.my_term_weight

        def loss(self, cap):              # a StepCapture -> (value, valid)
            ...

Everything else is derived from the registered classes: the flags of `llava-train` & co. (the config classes),
the names `--regularizer` accepts, the configs `attach()` takes, the `Preserver`'s loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..capture import StepCapture
from ..config import ConfigError


@dataclass(frozen=True)
class ModelDims:
    """What a method may size itself from: the LLM's decoder depth and width, the vision encoder's width."""
    num_layers: int
    hidden_size: int
    vision_hidden_size: int


@dataclass
class SetupContext:
    """What `Method.setup` may touch. Everything it changes must be undone through `patches` (detach restores
    the model exactly)."""
    model: nn.Module
    adapter: object
    patches: object                     # patching.Patches: call_on_undo, add_hook, setattr
    current_capture: Callable           # () -> the StepCapture of the forward in progress (or None)
    teacher: nn.Module | None = None    # attach(teacher=...): a loaded module some methods need


class Method:
    """One preservation method. Class attributes declare what it needs; instances are built per run."""
    name: str = ""
    config_class: type | None = None
    has_loss = True              # False: the method only changes the model at setup (attention tuning)
    replaces_lm_loss = False     # True: its value is the loss instead of the LM loss (soft labels)

    def __init__(self, cfg, dims: ModelDims):
        self.cfg = cfg
        self.weight = 1.0
        self.hidden_layers: tuple = ()          # decoder layers whose outputs `loss` reads (hidden_states)
        self.needs_visual_features = False      # whether `loss` reads the vision encoder's output
        self.heads: nn.Module | None = None     # training-only parameters, trained with the model, never exported

    def setup(self, ctx: SetupContext) -> None:
        """Called once when attached, after the capture is installed."""

    def loss(self, cap: StepCapture) -> tuple[torch.Tensor, bool]:
        """(value, valid): value computed on every rank (ZeRO-3 runs identical code everywhere); valid False where
        the batch had nothing to measure, and then the value enters with weight 0."""
        raise NotImplementedError(f"{type(self).__name__} declares has_loss but defines no loss()")

    def placeholder(self, cap: StepCapture) -> torch.Tensor:
        """A finite value that uses every head parameter as `loss` does (DDP waits for their gradients, ZeRO-3
        gathers them on every rank); it stands in, weighted by 0, for a term that came out NaN or infinite. A
        method with heads overrides it; without heads nothing needs to be touched."""
        ref = cap.inputs_embeds if cap.inputs_embeds is not None else cap.attention_mask
        return torch.zeros((), device=None if ref is None else ref.device)


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class under its `name` (a class decorator; also the way to add a method from outside)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register: {cls!r} is not a subclass of vlm_preserve.regularizers.Method")
    if not cls.name or cls.name == "none" or "," in cls.name:
        raise ValueError(f"register: {cls.__name__}.name {cls.name!r} must be a non-empty name other than 'none', "
                         "without commas (it is what --regularizer takes)")
    known = REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"register: the name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    taken = {f for other in REGISTRY.values() if other is not cls for f in _flags(other)}
    clash = sorted(taken & set(_flags(cls)))
    if clash:
        raise ValueError(f"register: {cls.__name__}'s config fields {clash} are flags of another method; "
                         "prefix them with the method's name")
    REGISTRY[cls.name] = cls
    return cls


def _flags(cls: type[Method]) -> list[str]:
    import dataclasses
    return [f.name for f in dataclasses.fields(cls.config_class)] if cls.config_class is not None else []


def method_class(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"--regularizer: unknown term {name!r}; choose from: none, {', '.join(REGISTRY)} "
                          f"(combine with commas, e.g. rdd,pre).") from None
