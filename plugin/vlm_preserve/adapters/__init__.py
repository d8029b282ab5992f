"""One module per upstream. Each answers the same questions — where are the embedding, projector and
decoder layers; how are image positions found; how is the trainer's loss reached; what must a
checkpoint exclude — and never computes a loss.

An adapter is any object with `model_dims(model)`, `llm_modules(model)`, `projector_modules(model)` and
`install_capture(model, slot, visual_features=...)`: the `llava` and `transformers_native` modules, or a
`GenericAdapter` instance.
"""
from __future__ import annotations

from ..config import ConfigError


def resolve_adapter(model, adapter=None):
    """The adapter for `model`: the one given, else chosen by model class."""
    if adapter is not None:
        return adapter
    from . import llava, transformers_native
    for m in model.modules():
        if hasattr(type(m), "prepare_inputs_labels_for_multimodal") and hasattr(type(m), "get_model"):
            return llava
    if transformers_native.find_vlm(model) is not None:
        return transformers_native
    raise ConfigError(
        f"no adapter for {type(model).__name__}. Supported by class: {', '.join(transformers_native.SUPPORTED)}, "
        "and upstream LLaVA/Bunny models. For any other VLM, name its modules with "
        "vlm_preserve.GenericAdapter(embed=..., projector=..., layers=..., image_token_id=... or image_mask_key=...).")
