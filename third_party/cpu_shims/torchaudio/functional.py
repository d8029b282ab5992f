def resample(*args, **kwargs):
    raise RuntimeError("torchaudio is a CPU test shim here (third_party/cpu_shims): no audio support")
