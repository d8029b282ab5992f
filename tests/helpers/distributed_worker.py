"""One process of the multi-process runs in test_distributed.py (DeepSpeed, --stage), test_fsdp.py (accelerate
FSDP, --fsdp) and test_ddp.py (the Trainer's own DDP, --ddp), launched by torchrun, 2 ranks over gloo on CPU; or,
with none of these, the single-process run they are compared with.

Every run: a tiny LlavaForConditionalGeneration loaded with from_pretrained *after* TrainingArguments exist (so
under ZeRO-3 it is built partitioned, as upstream scripts build it; FSDP shards it in the Trainer's prepare), the
regularizers attached with `attach`, two optimizer steps over four pre-built batches in order. Distributed:
per-device batch 1 on 2 ranks (rank r gets batch 2s+r at step s). Reference: one process, gradient accumulation 2 over the same batches in the same order:
the same global batch, so every logged value must agree. Step 1 gives rank 0 a mixed batch (two images and a
text-only sample, which distill routes to the teacher) and rank 1 an image-only one (one image, nothing routed:
the teacher does not run there); a hang here times the launcher out.

For `rdd,pre,distill` the run also saves a checkpoint at each step and resumes a fresh trainer from checkpoint-1.
Results (log rows, resumed rows) go to OUT/<regularizers>/result.json from rank 0.

--cuda (benchmarks/gpu_check.sh): the same runs on GPUs, DeepSpeed over NCCL, one rank per GPU; with a single rank
the distributed run accumulates 2 micro-batches as the reference does, so the global batches still agree.
"""
import argparse
import json
import os
import sys

import torch
import transformers

from helpers.distributed_runs import leave_worker
from vlm_preserve import DistillConfig, add_language_monitor, attach
from vlm_preserve.regularizers import pre


REGS = ("rdd", "pre", "distill", "rdd,pre,distill")


def ds_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        # 0: every parameter is partitioned and gathered per forward, as a 7B model's are. The default (1e5 elements)
        # would keep all of this tiny model resident, and a collective mismatch could not show.
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False}}


class InOrder(transformers.Trainer):
    """Batches in dataset order, so the distributed and single-process runs see the same global batches."""
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# accelerate FSDP2 (transformers 5's default version; FSDP1 cannot run on CPU, docs/scale-out.md), full sharding,
# one unit per decoder and vision-encoder layer (Llava's `_no_split_modules` also names CLIPTextEmbeddings, absent
# here, so the layers are named); the heads stay in the root unit. FULL_STATE_DICT: each checkpoint gets a gathered
# model.safetensors next to FSDP's own pytorch_model_fsdp.bin.
FSDP_CONFIG = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
               "state_dict_type": "FULL_STATE_DICT",
               "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "CLIPEncoderLayer"]}


def fsdp_on_cpu() -> None:
    """accelerate 1.15 turns FSDP on only for accelerator device types (MULTI_GPU, MULTI_XPU, ...): on CPU
    (MULTI_CPU, gloo) it ignores the Trainer's FSDP plugin and silently runs DDP. This makes it take the FSDP
    path on CPU too; everything after (wrapping, sharding, state dicts, checkpoints) is accelerate's and torch's
    own. Test-only: on GPUs accelerate does this itself."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    init = AcceleratorState.__init__
    if getattr(init, "_fsdp_on_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs
    __init__._fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def run(reg: str, out: str, data: dict, stage: int | None, save: bool, resume: str | None = None,
        fsdp: bool = False, ddp: bool = False, monitor: str = "", cuda: bool = False):
    if fsdp:
        fsdp_on_cpu()
    if stage:
        # On GPUs accelerate starts DeepSpeed's communication backend when TrainingArguments set up the devices;
        # with use_cpu it does not, and zero.Init (in from_pretrained) would then count a world size of 1.
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    ranks = int(os.environ.get("WORLD_SIZE", 1)) if stage or fsdp or ddp else 1
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=2 // ranks,
        max_steps=2, logging_steps=1, learning_rate=1e-3, save_strategy="steps" if save else "no", save_steps=1,
        report_to="none", use_cpu=not cuda, seed=0, remove_unused_columns=False, disable_tqdm=True,
        deepspeed=ds_config(stage) if stage else None,
        fsdp=fsdp, fsdp_config=dict(FSDP_CONFIG) if fsdp else None)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(data["model"], dtype=torch.float32)
    if fsdp:
        # The vision tower's last layer (and post-layernorm) never gets a gradient (Llava takes layer -2), so AdamW
        # keeps no state for it, and torch's FSDP2 optimizer load refuses such a checkpoint on resume ("Missing
        # optimizer state for parameter"), plugin or not. Frozen, it trains exactly as before (values unchanged).
        for n, p in model.named_parameters():
            if n.startswith(("model.vision_tower.encoder.layers.1.", "model.vision_tower.post_layernorm.")):
                p.requires_grad_(False)
    trainer = InOrder(model=model, args=args, train_dataset=Items(data["batches"]), data_collator=lambda xs: xs[0])
    handle = attach(trainer, reg, *([DistillConfig(distill_teacher=data["teacher"])] if "distill" in reg else []))
    if monitor:  # the language monitor on every rank, every step (test_monitor.py)
        from helpers.native_models import word_tokenizer
        add_language_monitor(trainer, monitor, steps=1, tokenizer=word_tokenizer())
    trainer.train(resume_from_checkpoint=resume)
    if fsdp:  # really sharded (accelerate's silent DDP fallback would leave plain tensors), the PRe head included
        from torch.distributed.tensor import DTensor
        assert all(isinstance(p, DTensor) for p in trainer.model.parameters()), "the model was not sharded by FSDP"
    rows = [r for r in trainer.state.log_history if "loss" in r or "lang_nll" in r]
    if not resume and save:
        trainer.save_model(os.path.join(out, "final"))  # ZeRO-3: gathered (stage3_gather_16bit_weights_on_model_save)
    handle.detach()
    return rows


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, default=0, help="DeepSpeed ZeRO stage; 0: the single-process reference")
    p.add_argument("--fsdp", action="store_true", help="accelerate FSDP2 instead of DeepSpeed")
    p.add_argument("--ddp", action="store_true", help="the Trainer's own DDP (torchrun, neither DeepSpeed nor FSDP)")
    p.add_argument("--language_monitor", default="", help="a language monitor text set, evaluated every step")
    p.add_argument("--regs", default=",".join(r.replace(",", "+") for r in REGS))
    p.add_argument("--cuda", action="store_true", help="on GPUs (DeepSpeed over NCCL) instead of CPU (gloo)")
    a = p.parse_args(argv)
    # Small chunks, so ranks with different visual-token counts (32 and 16 at step 1) run the PRe head a different
    # number of times per forward unless the plugin prevents it (ZeRO-3 gathers the head's weights on each call).
    pre.PRE_CHUNK = 8
    data = torch.load(a.data, weights_only=False)
    rank = int(os.environ.get("RANK", 0))
    for reg in a.regs.split(","):
        reg = reg.replace("+", ",")
        out = os.path.join(a.out, reg.replace(",", "+"))
        full = reg == REGS[-1]
        engine = dict(stage=a.stage or None, fsdp=a.fsdp, ddp=a.ddp, cuda=a.cuda)
        result = {"rows": run(reg, out, data, save=full, monitor=a.language_monitor, **engine)}
        if full and (a.stage or a.fsdp or a.ddp):
            result["resumed"] = run(reg, out + "-resumed", data, save=False, resume=os.path.join(out, "checkpoint-1"),
                                    **engine)
        if rank == 0:
            with open(os.path.join(out, "result.json"), "w") as f:
                json.dump(result, f)
        print(f"[worker rank {rank}] {reg} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
    leave_worker()
