"""Upstream LLaVA's own LlavaLlamaForCausalLM, driven through `deepspeed.initialize` with the plugin's Attachment
(llava environment; its pinned accelerate cannot run DeepSpeed on CPU, so not through train(): docs/scale-out.md).

    torchrun --nproc_per_node 2 tests/helpers/llava_distributed_worker.py FIXTURE OUT STAGE   # rank 0: text-only batch
    python tests/helpers/llava_distributed_worker.py FIXTURE OUT 0                           # the single-process reference

Rank 0's batch is text-only (upstream's collator gives each sample a zero image whose features are cut away, so the
vision tower runs on every rank; the plugin's image terms take their weight-0 path there), rank 1's has an image.
The reference runs both batches as two accumulated micro-batches. Writes OUT/result.json: per step, per batch,
the total loss and each term.
"""
import json
import os
import sys

import torch

from helpers.distributed_runs import leave_worker
from helpers.llava_models import build_model_and_batch
from vlm_preserve import DistillConfig, attach
from vlm_preserve.testing.fixtures import TinyLlavaFixture
from vlm_preserve.regularizers import pre

REG = "rdd,pre,distill"


def main(root: str, out: str, stage: int) -> None:
    pre.PRE_CHUNK = 8  # ranks see 0 and 16 visual tokens: different chunk counts unless the plugin prevents it
    fx = TinyLlavaFixture(*(os.path.join(root, p) if p else root for p in ("", "llm", "vision", "data.json", "images")))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    batches = [build_model_and_batch(fx, batch_size=3, text_only=(i == 0))[1] for i in range(2)]
    model, _ = build_model_and_batch(fx, batch_size=3)  # seeded: the same initial weights everywhere
    model.get_vision_tower().to(torch.float32)
    att = attach(model, REG, DistillConfig(distill_teacher=str(fx.llm)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    mine = batches if not stage else [batches[rank]]
    engine = model
    if stage:
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params, config=cfg)
    rows = []
    for step in range(2):
        per_batch = []
        for b in mine:
            res = engine(**b, **att.forward_kwargs())
            loss, logs = att.total_loss(res.loss, res)
            per_batch.append({"loss": loss.item(), **{k: (None if v is None else v.item()) for k, v in logs.items()}})
            if stage:
                engine.backward(loss)
            else:
                (loss / len(mine)).backward()
        if stage:
            engine.step()
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, per_batch[0])
            per_batch = gathered
        else:
            opt.step()
            opt.zero_grad()
        rows.append(per_batch)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    leave_worker()
