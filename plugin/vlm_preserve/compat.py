"""Shims for differences between the torch / transformers versions the upstreams pin, in one place."""
from __future__ import annotations

import torch

from .patching import Patches


def dtype_kwarg(dtype) -> dict:
    """`from_pretrained`'s dtype argument: `dtype` in transformers 5, `torch_dtype` before (5 warns on it)."""
    import transformers
    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def allow_numpy_rng_state(patches: Patches) -> None:
    """transformers 4.36 resumes with `torch.load(rng_state.pth)`, which torch >= 2.6 refuses (weights_only
    default) because the file holds numpy RNG arrays. Allow exactly those numpy types, for this run only."""
    import numpy as np
    if not hasattr(torch.serialization, "safe_globals"):
        return
    core = getattr(np, "_core", None) or np.core
    cm = torch.serialization.safe_globals([core.multiarray._reconstruct, np.ndarray, np.dtype,
                                           type(np.dtype(np.uint32))])
    cm.__enter__()
    patches.call_on_undo(lambda: cm.__exit__(None, None, None))


def autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) of the autocast in effect for `device_type`: torch >= 2.4 asks by device, 2.0-2.3 had one
    function per device."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
