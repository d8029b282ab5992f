# CPU test environments only: LLaMA-Factory's multimodal data plugin imports torchaudio at import time, and the
# torchaudio wheels on PyPI link against CUDA builds of torch (the CPU torch pinned here cannot load them). Only
# audio samples use it; the tests have none. Never put this directory on the path of a GPU environment: install
# the real torchaudio there.
__version__ = "0.0.0+cpu-shim"


def load(*args, **kwargs):
    raise RuntimeError("torchaudio is a CPU test shim here (third_party/cpu_shims): no audio support")


from . import functional  # noqa: E402,F401
