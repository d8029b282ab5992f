"""Upstream LLaVA (haotian-liu/LLaVA, llava-torch on PyPI): its `llava/train/train.py:train()` with LLaVATrainer,
the LLaVA adapter, distill's route field through its dataset. `llava-train` (cli/llava_train.py) launches it."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Optional

from .upstream import UpstreamSpec

LLAVA_INSTALL = ("upstream LLaVA is not installed. Install the pinned version with:\n"
                 "  pip install --no-deps llava-torch==1.2.2.post1\n"
                 "  pip install -r third_party/llava/requirements.txt   (see third_party/llava/README.md)")


def _identify(train_module) -> str | None:
    # NVILA (NVlabs/VILA) installs a package also named `llava`; its arguments live in llava/train/args.py.
    if importlib.util.find_spec("llava.train.args") is not None or not hasattr(train_module, "LLaVATrainer"):
        return ("the installed `llava` package is not upstream LLaVA (haotian-liu/LLaVA): it looks like NVILA "
                "(NVlabs/VILA), which llava-train does not drive; use nvila-train for it.")
    return None


@dataclass
class LlavaLaunchArguments:
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "Passed to upstream train(attn_implementation=...) (LLaVA): flash_attention_2 = upstream's train_mem.py."})


def _start(upstream, extra: LlavaLaunchArguments, patches) -> None:
    upstream.train(attn_implementation=extra.attn_implementation)


SPEC = UpstreamSpec(command="llava-train", package="llava", train_module="llava.train.train", trainer="LLaVATrainer",
                    model_registry="llava.model", install=LLAVA_INSTALL, identify=_identify,
                    data_module="llava.train.train", supports_distill=True,
                    extra_arguments=LlavaLaunchArguments, start=_start)
