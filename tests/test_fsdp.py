"""Multi-process training on CPU under accelerate FSDP2 (`TrainingArguments(fsdp=True, fsdp_config={"version": 2})`),
2 ranks over gloo (torchrun), the HF Trainer on a tiny LlavaForConditionalGeneration with every regularizer; the
same runs as test_distributed.py's DeepSpeed ones (tests/helpers/distributed_worker.py --fsdp), compared with the same
single-process reference.

- Values: every logged value at both steps equals the single-process run on the same global batches within REL.
  Both are fp32 and differ only in summation order (FSDP's reduce-scatter of gradient shards vs local
  accumulation); measured here: at most 4.1e-7 relative over two Adam steps. REL = 1e-5 as for DeepSpeed: ~25x that,
  and far below a real error (a term dropped on one rank or counted twice moves the loss by > 1e-3).
- No hang: step 1 gives the ranks different modalities and visual-token counts (distill's teacher runs on rank 0
  only; the PRe head sees 32 vs 16 visual tokens, in chunks of 8); each launch has a timeout.
- Sharding: every parameter is a DTensor shard, the PRe head's included (it stays in the root FSDP unit); each
  checkpoint's heads file holds the gathered head, equal to FSDP's own checkpoint; a resumed run repeats the
  uninterrupted one; the final model (and each checkpoint's model.safetensors) has no head and no teacher, equals
  the reference, and is accepted by merge and extract-llm.
accelerate 1.15 ignores the FSDP plugin on CPU (it runs DDP); the worker's `fsdp_on_cpu` makes it take its FSDP
path, as it does on GPUs (docs/scale-out.md).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("needs transformers >= 4.52 (the transformers-native environment)", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    from accelerate.utils import DistributedType
    assert hasattr(DistributedType, "FSDP")
except (ImportError, AssertionError):
    pytest.skip("needs torch FSDP2 (fully_shard) and accelerate with FSDP", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from helpers.distributed_runs import assert_rows_equal, result, run_worker  # noqa: E402
from helpers.distributed_worker import REGS  # noqa: E402
from helpers.native_models import teacher_of  # noqa: E402

REL = 1e-5
FULL = REGS[-1].replace(",", "+")
HEAD_SHAPES = {"pre.0.weight": (32, 32), "pre.0.bias": (32,), "pre.2.weight": (32, 32), "pre.2.bias": (32,)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("fsdp"), {"fsdp": ["--fsdp"]})


@pytest.mark.parametrize("reg", REGS)
def test_values_equal_the_single_process_run_on_the_same_global_batch(runs, reg):
    reg = reg.replace(",", "+")
    want = result(runs, "ref", reg)["rows"]
    assert_rows_equal(result(runs, "fsdp", reg)["rows"], want, f"FSDP2 {reg}", REL)
    names = {"rdd": "rdd_loss", "pre": "pre_loss", "distill": "distill_loss"}
    assert all(names[n] in r for r in want for n in reg.split("+")), want


def test_heads_checkpointed_and_resume_repeats_the_uninterrupted_run(runs):
    out = runs / "fsdp" / FULL
    for step in (1, 2):
        ckpt = out / f"checkpoint-{step}"
        heads = load_file(ckpt / "vlm_preserve_heads.safetensors")
        assert {k: tuple(v.shape) for k, v in heads.items()} == HEAD_SHAPES  # gathered, not this rank's shard
        # the trained head: FSDP's own (full) checkpoint of the model holds the same values
        fsdp_state = torch.load(ckpt / "pytorch_model_fsdp.bin", weights_only=True)
        for k, v in heads.items():
            assert torch.isfinite(v).all() and v.abs().sum() > 0
            torch.testing.assert_close(v, fsdp_state[f"vlm_preserve_heads.{k}"], rtol=0, atol=0)
    r = result(runs, "fsdp", FULL)
    assert_rows_equal(r["resumed"], r["rows"], "FSDP2 resumed from checkpoint-1", REL)


def test_final_model_has_no_heads_equals_the_reference_and_merges(runs, tmp_path):
    ref = runs / "ref" / FULL / "final"
    want = load_file(ref / "model.safetensors")
    out = runs / "fsdp" / FULL
    for folder in (out / "final", out / "checkpoint-2"):  # save_model's export, and each checkpoint's gathered model
        got = load_file(folder / "model.safetensors")
        assert set(got) == set(want), folder  # no vlm_preserve_heads.*, no teacher, nothing missing
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{folder.name} {k}: {m}")

    from vlm_preserve.offline.extract import extract_llm
    from vlm_preserve.offline.merge import merge
    llm_want = teacher_of(transformers.LlavaForConditionalGeneration.from_pretrained(ref)).state_dict()
    for src in (out / "final", out / "checkpoint-2"):  # a checkpoint folder also holds the heads file, FSDP's files
        llm = tmp_path / f"llm-{src.name}"
        extract_llm(str(src), str(llm))
        assert set(load_file(llm / "model.safetensors")) == set(llm_want), src
        got = transformers.AutoModelForCausalLM.from_pretrained(llm).state_dict()
        for k, v in llm_want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{src.name} {k}: {m}")
    merged = merge(str(out / "checkpoint-2"), str(runs / "teacher"), [0.5], str(tmp_path / "merged"),
                   show_progress=False)[0]
    assert set(load_file(merged / "model.safetensors")) == set(want)
    assert not (merged / "vlm_preserve_heads.safetensors").exists()
