"""Multi-process training on CPU under the HF Trainer's own DistributedDataParallel (torchrun, neither DeepSpeed nor
FSDP: what the Trainer does on several GPUs by default), 2 ranks over gloo; the runs of test_distributed.py
(tests/helpers/distributed_worker.py --ddp), compared with the same single-process reference.

The Trainer builds DDP with find_unused_parameters=True (no gradient checkpointing). DDP then looks for the
parameters the forward used by walking back from the forward's outputs; the PRe head runs after the forward, in
the loss, so without the plugin's anchor DDP marks it unused and fails when its gradient arrives ("marked as
ready twice"). Values: equal to the single-process run within REL = 1e-5 (both fp32, only the summation order
differs, as for DeepSpeed and FSDP); checkpoints hold the head; a resumed run trains on with every term; the final
model has no heads. Resume cannot be compared with the uninterrupted run here: without DeepSpeed or FSDP,
transformers 5.23's Trainer reloads a Llava checkpoint with load_state_dict(strict=False) while save_pretrained wrote
the legacy key names, so the model's weights are silently not restored, plugin or not (checked with the plugin off;
tests/test_native_trainer.py meets the same).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("needs transformers >= 4.52 (the transformers-native environment)", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from helpers.distributed_runs import assert_rows_equal, result, run_worker  # noqa: E402
from helpers.distributed_worker import REGS  # noqa: E402

REL = 1e-5
RUNS = ("pre", REGS[-1].replace(",", "+"))  # the head is PRe's; the full set also saves and resumes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("ddp"), {"ddp": ["--ddp"]}, regs=",".join(RUNS))


@pytest.mark.parametrize("reg", RUNS)
def test_values_equal_the_single_process_run_on_the_same_global_batch(runs, reg):
    want = result(runs, "ref", reg)["rows"]
    assert_rows_equal(result(runs, "ddp", reg)["rows"], want, f"DDP {reg}", REL)
    assert all("pre_loss" in r for r in want), want


def test_checkpoints_hold_the_head_resume_trains_on_and_the_final_model_has_no_heads(runs):
    out = runs / "ddp" / RUNS[-1]
    for step in (1, 2):
        heads = load_file(out / f"checkpoint-{step}" / "vlm_preserve_heads.safetensors")
        assert {k.split(".", 1)[0] for k in heads} == {"pre"} and all(torch.isfinite(v).all() for v in heads.values())
    resumed = result(runs, "ddp", RUNS[-1])["resumed"]
    assert [r["step"] for r in resumed] == [1, 2]  # step 1's row comes from the checkpoint's trainer state
    assert all(name in resumed[1] for name in ("rdd_loss", "pre_loss", "distill_loss")), resumed
    want = load_file(runs / "ref" / RUNS[-1] / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    assert set(got) == set(want)  # no vlm_preserve_heads.*, no teacher
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
