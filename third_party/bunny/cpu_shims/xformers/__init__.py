# CPU test environments only: Bunny's EVA-CLIP module imports `xformers.ops` at import time, and xformers
# ships CUDA builds pinned to other torch versions. Only EVA-CLIP towers use it; the tests use SigLIP.
# Never put this directory on the path of a GPU environment: install the real xformers there.
