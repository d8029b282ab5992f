"""CPU shim: lets modules that import flash-attn at top level load; any call says it is unavailable."""


def unavailable(name):
    def fn(*args, **kwargs):
        raise RuntimeError(f"flash_attn.{name} called, but this is the CPU import shim (vlm-preserve "
                           "third_party/nvila/cpu_shims): flash-attn needs a CUDA GPU.")
    fn.__name__ = name
    return fn
