"""Upstream NVILA (NVlabs/VILA): its own `llava/train/train_mem.py`, run as `__main__` (so its own patches of
transformers and accelerate stay in force), with LLaVATrainer, the NVILA adapter and its loss scaling.
`nvila-train` (cli/nvila_train.py) launches it.

NVILA installs a package named `llava`, like upstream LLaVA: each spec checks which one it got.
"""
from __future__ import annotations

import importlib.util
import runpy
import socket
from dataclasses import dataclass, field

from ..config import LossScaling
from .upstream import UpstreamSpec

NVILA_INSTALL = ("upstream NVILA is not installed. It is not on PyPI: install it from a checkout of NVlabs/VILA at "
                 "the pinned commit (third_party/nvila/README.md):\n"
                 "  pip install -r third_party/nvila/requirements.txt && pip install --no-deps -e <checkout>")


@dataclass
class NVILALaunchArguments:
    cpu_compat: bool = field(default=False, metadata={"help": (
        "Run NVILA's train() without a GPU (tests, smoke runs): sdpa attention instead of the flash_attention_2 "
        "it hard-codes, float32 weights instead of bf16/fp16, a one-process gloo group for its checkpoint "
        "barrier, and its non-DeepSpeed final save made to work (third_party/nvila/README.md).")})


def _identify(train_module) -> str | None:
    if importlib.util.find_spec("llava.train.args") is None or not hasattr(train_module, "LLaVATrainer"):
        return ("the installed `llava` package is not NVILA (NVlabs/VILA): it has no llava/train/args.py, so it looks "
                "like upstream LLaVA (haotian-liu/LLaVA), which nvila-train does not drive; use llava-train for it.")
    return None


def cpu_compat(patches) -> None:
    """The four changes `--cpu_compat True` makes, each undone with `patches`."""
    import torch.distributed as dist
    import transformers.modeling_utils as mu

    import llava.model.llava_arch as arch
    import llava.train.train as train

    autoset = mu.PreTrainedModel.__dict__["_autoset_attn_implementation"].__func__

    def no_flash(cls, config, *args, **kwargs):
        if getattr(config, "_attn_implementation_internal", None) == "flash_attention_2":
            config._attn_implementation = "sdpa"
        return autoset(cls, config, *args, **kwargs)
    patches.setattr(mu.PreTrainedModel, "_autoset_attn_implementation", classmethod(no_flash))

    prepare = train.prepare_config_for_training

    def float32(config, *args, **kwargs):
        prepare(config, *args, **kwargs)
        config.model_dtype = "torch.float32"
    patches.setattr(train, "prepare_config_for_training", float32)

    save = arch.LlavaMetaModel.save_pretrained
    patches.setattr(arch.LlavaMetaModel, "save_pretrained",
                    lambda self, output_dir, state_dict=None, **_hf_kwargs: save(self, output_dir, state_dict=state_dict))

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
        patches.call_on_undo(dist.destroy_process_group)


def _start(upstream, extra, patches) -> None:
    if extra.cpu_compat:
        cpu_compat(patches)
    runpy.run_module("llava.train.train_mem", run_name="__main__", alter_sys=False)


SPEC = UpstreamSpec(command="nvila-train", package="llava (NVILA)", train_module="llava.train.train",
                    trainer="LLaVATrainer", model_registry="llava.model", install=NVILA_INSTALL, identify=_identify,
                    adapter="nvila", extra_arguments=NVILALaunchArguments, start=_start, llm_config_folder="llm",
                    # its patched training_step multiplies the loss by grad-accumulation steps x world size
                    loss_scaling=LossScaling(times_world_size=True),
                    head_filters=("get_peft_state_maybe_zero_3", "get_peft_state_non_lora_maybe_zero_3",
                                  "llava.train.llava_trainer:get_peft_state_non_lora_maybe_zero_3"))
