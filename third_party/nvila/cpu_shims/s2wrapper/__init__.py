def forward(*args, **kwargs):
    raise NotImplementedError("s2wrapper CPU shim: S2 multi-scale vision towers are not available here")
