# CPU test environments only. The torchvision wheel on PyPI for torch 2.13.0 is a CUDA build: its C++ ops cannot
# load with the CPU torch pinned here. Its Python part (what transformers' image and video processors use) works
# without them, except that importing it registers fake kernels for two ops unconditionally; declaring those two
# ops first (without kernels) lets it import, with torchvision.extension._has_ops() False. Never put this
# directory on the path of a GPU environment.
import importlib.abc
import sys

_LIBS = []


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch
            lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBS.append(lib)
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
