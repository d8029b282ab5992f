"""One adapter class per upstream (the contract: `base.Adapter`). Each answers the same questions — where are the
embedding, projector and decoder layers; how are image positions found; how does one forward become a
StepCapture — and never computes a loss.

`ADAPTERS` lists the built-in ones by name (the launchers' `UpstreamSpec.adapter`); a custom VLM uses a
`GenericAdapter` instance, or any `Adapter` subclass passed to `attach(..., adapter=...)`.
"""
from __future__ import annotations

from ..config import ConfigError
from .base import Adapter
from .generic import GenericAdapter
from .llava import LlavaAdapter
from .nvila import NVILAAdapter
from .transformers_native import SUPPORTED, TransformersAdapter

ADAPTERS: dict[str, type[Adapter]] = {c.name: c for c in (LlavaAdapter, NVILAAdapter, TransformersAdapter)}


def resolve_adapter(model, adapter=None) -> Adapter:
    """The adapter for `model`: the one given, else the first built-in one whose `matches` recognises the model."""
    if adapter is not None:
        if not isinstance(adapter, Adapter):
            raise TypeError(f"adapter={adapter!r} is not a vlm_preserve Adapter; pass an instance of a subclass of "
                            "vlm_preserve.adapters.Adapter, e.g. GenericAdapter(embed=..., projector=..., ...)")
        return adapter
    for cls in ADAPTERS.values():
        if cls.matches(model):
            return cls()
    raise ConfigError(
        f"no adapter for {type(model).__name__}. Supported by class: {', '.join(SUPPORTED)}, "
        "and upstream LLaVA/Bunny models. For any other VLM, name its modules with "
        "vlm_preserve.GenericAdapter(embed=..., projector=..., layers=..., image_token_id=... or image_mask_key=...).")


__all__ = ["ADAPTERS", "Adapter", "GenericAdapter", "LlavaAdapter", "NVILAAdapter", "TransformersAdapter",
           "resolve_adapter"]
