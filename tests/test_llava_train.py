"""Real upstream LLaVA `train()` through `llava-train`, end to end on the tiny fixture (subprocesses, as
a user runs it)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import entry_command, entry_env, needs_llava, paired, run_entry, step_rows
from helpers import kill
from helpers.llava_models import weights

pytestmark = needs_llava

TERMS = {"rdd": ["rdd_loss"], "pre": ["pre_loss"], "rdd,pre": ["rdd_loss", "pre_loss"],
         "soft_label": ["soft_label_loss"], "dft": ["dft_loss"], "attention_tuning": []}


def test_none_is_bit_identical_to_plain_upstream(tiny_llava, tmp_path):
    run_entry("upstream", tiny_llava.train_args(tmp_path / "upstream"))
    run_entry("plugin", tiny_llava.train_args(tmp_path / "plugin") + ["--regularizer", "none"])
    a, b = step_rows(tmp_path / "upstream"), step_rows(tmp_path / "plugin")
    assert len(a) == 4 and [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = weights(tmp_path / "upstream"), weights(tmp_path / "plugin")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


RUNS = [
    ("rdd", ["--rdd_kernel", "rbf"]), ("rdd", ["--rdd_kernel", "linear"]), ("rdd", ["--rdd_kernel", "poly"]),
    ("rdd", ["--rdd_kernel", "l2"]), ("pre", ["--pre_anchor", "pre_llm"]), ("pre", ["--pre_anchor", "pre_proj"]),
    ("rdd,pre", []), ("attention_tuning", []), ("soft_label", ["--soft_label_variant", "uniform"]),
    ("soft_label", ["--soft_label_variant", "dynamic", "--soft_label_alpha", "0.2"]), ("dft", []),
]


@pytest.mark.parametrize("reg,extra", RUNS, ids=[f"{r}{''.join(e[1:2])}" for r, e in RUNS])
def test_each_regularizer_trains_and_logs_its_terms(tiny_llava, tmp_path, reg, extra):
    out = tmp_path / "run"
    p = run_entry("plugin", tiny_llava.train_args(out) + ["--regularizer", reg, *extra])
    assert "tokenization mismatch" not in p.stdout + p.stderr
    rows = step_rows(out)
    assert len(rows) == 4 and all(r["lm_loss"] > 1.0 for r in rows)  # a real loss, not masked-out targets
    for row in rows:
        for name in ["loss", "lm_loss", *TERMS[reg]]:
            assert name in row and math.isfinite(row[name]), (name, row)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    final = weights(out)
    assert final and not any("vlm_preserve" in k for k in final)
    init_llm = weights(tiny_llava.llm)
    init_vision = weights(tiny_llava.vision)
    # the vision tower is frozen by upstream in every run (and cast to fp16 when training in fp32)
    for k, v in init_vision.items():
        assert torch.equal(final[f"model.vision_tower.vision_tower.{k}"], v.half()), k
    changed = {k for k, v in init_llm.items() if not torch.equal(final[k], v)}
    if reg == "attention_tuning":
        assert changed and all(".self_attn." in k for k in changed), sorted(changed)[:5]
        assert any("q_proj" in k for k in changed)
    else:
        assert "model.embed_tokens.weight" in changed and any(".mlp." in k for k in changed)


def test_export_loads_without_the_plugin(tiny_llava, tmp_path):
    out = tmp_path / "run"
    run_entry("plugin", tiny_llava.train_args(out) + ["--regularizer", "rdd,pre"])
    code = ("import sys, torch; from llava.model import LlavaLlamaForCausalLM; "
            f"m = LlavaLlamaForCausalLM.from_pretrained({str(out)!r}); "
            "assert 'vlm_preserve' not in sys.modules; "
            "assert not any('vlm_preserve' in k for k in m.state_dict()); print('loaded', type(m).__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0 and "loaded LlavaLlamaForCausalLM" in p.stdout, p.stderr[-3000:]


def test_gradient_checkpointing_on_equals_off(tiny_llava, tmp_path):
    for gc in ("False", "True"):
        run_entry("plugin", tiny_llava.train_args(tmp_path / gc, gradient_checkpointing=gc)
                  + ["--regularizer", "rdd,pre"])
    off, on = step_rows(tmp_path / "False"), step_rows(tmp_path / "True")
    for a, b in paired(off, on):
        for k in ("loss", "lm_loss", "rdd_loss", "pre_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a, b)


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny_llava, tmp_path):
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full = tmp_path / "full"
    run_entry("plugin", tiny_llava.train_args(full, **args) + ["--regularizer", "rdd,pre"])
    ckpt = full / "checkpoint-3"
    assert (ckpt / "vlm_preserve_heads.safetensors").exists()
    assert not any("vlm_preserve" in k for k in weights(ckpt))  # heads live in their own file
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ckpt, resumed / "checkpoint-3")  # upstream train() resumes when a checkpoint exists
    run_entry("plugin", tiny_llava.train_args(resumed, **args) + ["--regularizer", "rdd,pre"])
    a = [r for r in step_rows(full) if r["step"] > 3]
    b = [r for r in step_rows(resumed) if r["step"] > 3]  # log_history carries the checkpoint's rows
    assert [r["step"] for r in b] == [4, 5, 6]
    for x, y in paired(a, b):
        for k in ("loss", "lm_loss", "rdd_loss", "pre_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x, y)
    wa, wb = weights(full), weights(resumed)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


KILL_ARGS = dict(max_steps=6, save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llava, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_entry("plugin", tiny_llava.train_args(out, **KILL_ARGS) + ["--regularizer", "rdd,pre"])
    assert all((out / f"checkpoint-{s}" / "vlm_preserve_complete").exists() for s in (2, 4, 6))
    return out


# between checkpoints; inside upstream's part of checkpoint-4's save (transformers 4.36 writes it into
# tmp-checkpoint-4 and renames it after); after that rename, as the plugin writes its heads into checkpoint-4
@pytest.mark.parametrize("pause", ["log:3", "rng:4", "heads:4"])
def test_sigkilled_llava_train_resumes_as_if_uninterrupted(tiny_llava, tmp_path, uninterrupted, pause):
    """llava-train SIGKILLed mid-run and rerun with the same command (upstream train() resumes when a checkpoint-*
    exists) logs the same loss and per-term sequence and ends with the same weights as an uninterrupted run; a cut
    checkpoint is named and skipped (tests/test_kill.py: the same on the Python API)."""
    out = tmp_path / "run"
    args = tiny_llava.train_args(out, **KILL_ARGS) + ["--regularizer", "rdd,pre"]
    kill.kill_at(entry_command("plugin", args), entry_env(), pause)
    assert (out / "checkpoint-2" / "vlm_preserve_complete").exists()
    if pause == "heads:4":
        assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "vlm_preserve_complete").exists()
    p = run_entry("plugin", args)
    log = p.stdout + p.stderr
    assert f"resuming from {out / 'checkpoint-2'}" in log, log[-3000:]
    if pause == "heads:4":
        assert f"{out / 'checkpoint-4'} is incomplete" in log, log[-3000:]
    assert not (out / "tmp-checkpoint-4").exists()
    a, b = step_rows(uninterrupted), step_rows(out)
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    for x, y in paired(a, b):
        assert x.keys() == y.keys() and {"rdd_loss", "pre_loss"} <= x.keys()
        for k in ("loss", "lm_loss", "rdd_loss", "pre_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x, y)
    wa, wb = weights(uninterrupted), weights(out)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    heads = [load_file(o / "checkpoint-6" / "vlm_preserve_heads.safetensors") for o in (uninterrupted, out)]
    for k in heads[0]:
        torch.testing.assert_close(heads[0][k], heads[1][k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_refuses_a_checkpoint_without_heads(tiny_llava, tmp_path):
    out = tmp_path / "run"
    run_entry("plugin", tiny_llava.train_args(out, max_steps=2, save_strategy="steps", save_steps=2))
    p = run_entry("plugin", tiny_llava.train_args(out, max_steps=4, save_strategy="steps", save_steps=2)
                  + ["--regularizer", "pre"], check=False)
    assert p.returncode != 0 and "vlm_preserve_heads.safetensors is missing" in p.stderr


@pytest.mark.parametrize("reg", ["rdd,pre", "soft_label"])
def test_lora_path_keeps_heads_out_of_non_lora_trainables(tiny_llava, tmp_path, reg):
    out = tmp_path / "lora"
    run_entry("plugin", tiny_llava.train_args(out, lora_enable="True", lora_r=4, lora_alpha=8, lora_bias="all")
              + ["--regularizer", reg])
    rows = step_rows(out)
    assert len(rows) == 4 and all(math.isfinite(r[k]) for r in rows for k in TERMS[reg])
    non_lora = torch.load(out / "non_lora_trainables.bin", map_location="cpu")
    assert any("mm_projector" in k for k in non_lora)
    assert not any("vlm_preserve" in k for k in non_lora)
    adapter = weights(out)
    assert adapter and any("lora_" in k for k in adapter) and not any("vlm_preserve" in k for k in adapter)


@pytest.mark.parametrize("reg", ["rdd,pre", "soft_label"])
def test_projector_pretraining_path(tiny_llava, tmp_path, reg):
    out = tmp_path / "pretrain"
    run_entry("plugin", tiny_llava.train_args(out, tune_mm_mlp_adapter="True") + ["--regularizer", reg])
    rows = step_rows(out)
    assert len(rows) == 4 and all(math.isfinite(r[k]) for r in rows for k in TERMS[reg])
    saved = torch.load(out / "mm_projector.bin", map_location="cpu")
    assert saved and all("mm_projector" in k for k in saved)


def test_bf16_with_gradient_checkpointing_matches_fp32_terms(tiny_llava, tmp_path):
    """Mixed precision: the model in bf16 (upstream loads it so with --bf16), terms still computed in fp32."""
    run_entry("plugin", tiny_llava.train_args(tmp_path / "fp32", max_steps=1) + ["--regularizer", "rdd,pre"])
    run_entry("plugin", tiny_llava.train_args(tmp_path / "bf16", max_steps=1, bf16="True", gradient_checkpointing="True")
              + ["--regularizer", "rdd,pre"])
    (a,), (b,) = step_rows(tmp_path / "fp32"), step_rows(tmp_path / "bf16")
    for k in ("lm_loss", "rdd_loss", "pre_loss"):
        assert math.isfinite(b[k]) and b[k] == pytest.approx(a[k], rel=3e-2, abs=1e-2), (k, a, b)
    final = weights(tmp_path / "bf16")
    assert final["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert not any("vlm_preserve" in k for k in final)


def test_pre_head_is_optimised_and_saved_per_checkpoint(tiny_llava, tmp_path):
    out = tmp_path / "run"
    run_entry("plugin", tiny_llava.train_args(out, save_strategy="steps", save_steps=2) + ["--regularizer", "pre"])
    h2 = load_file(out / "checkpoint-2" / "vlm_preserve_heads.safetensors")
    h4 = load_file(out / "checkpoint-4" / "vlm_preserve_heads.safetensors")
    assert set(h2) == {"pre.0.weight", "pre.0.bias", "pre.2.weight", "pre.2.bias"}
    assert all(not torch.equal(h2[k], h4[k]) for k in h2)
