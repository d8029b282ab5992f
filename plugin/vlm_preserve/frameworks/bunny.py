"""Upstream Bunny (BAAI-DCAI/Bunny): its `bunny/train/train.py:train()` with BunnyTrainer. `bunny-train`
(cli/bunny_train.py) launches it.

Bunny's model code has the same multimodal interface as LLaVA's (`prepare_inputs_labels_for_multimodal`,
`get_model().mm_projector`), so the LLaVA adapter serves it; what differs is handled there (the input ids
mutated in place, Phi's `final_layernorm`).
"""
from __future__ import annotations

from .upstream import UpstreamSpec

BUNNY_INSTALL = ("upstream Bunny is not installed. It is not on PyPI: install it from a checkout of "
                 "BAAI-DCAI/Bunny at the pinned commit (third_party/bunny/README.md):\n"
                 "  pip install -r third_party/bunny/requirements.txt && pip install --no-deps -e <checkout>")


def _identify(train_module) -> str | None:
    return None if hasattr(train_module, "BunnyTrainer") else "the installed `bunny` package has no BunnyTrainer."


SPEC = UpstreamSpec(command="bunny-train", package="bunny", train_module="bunny.train.train", trainer="BunnyTrainer",
                    model_registry="bunny.model", install=BUNNY_INSTALL, identify=_identify,
                    data_module="bunny.util.data_utils", supports_distill=True)
