"""The Trainer path on transformers-native VLMs: terms logged by name, the head trained, saved with each
checkpoint and restored on resume, absent from save_pretrained; user compute_loss overrides and
compute_loss_func keep working; TRL's SFTTrainer example runs."""
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("needs transformers >= 4.52 (the transformers-native environment)", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from helpers.native_models import KINDS, build, make_batch, rows, trainer_for  # noqa: E402
from vlm_preserve import attach  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]





def saved(path) -> dict:
    out = {}
    for f in Path(path).glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_terms_checkpoints_resume_and_clean_export(kind, tmp_path):
    model = build(kind)
    trainer = trainer_for(model, kind, tmp_path / "full", save_strategy="steps")
    handle = attach(trainer, "rdd,pre")
    head0 = {k: v.clone() for k, v in handle.attachment.heads.state_dict().items()}
    trainer.train()
    logged = rows(trainer)
    assert len(logged) == 4
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["lm_loss"]) for r in logged)
    # one batch is text-only: its terms entered with weight 0 and are not averaged into the log
    measured = [r for r in logged if "rdd_loss" in r]
    assert len(measured) == 3 and all(math.isfinite(r["rdd_loss"]) and math.isfinite(r["pre_loss"]) for r in measured)
    assert all("pre_loss" not in r for r in logged if "rdd_loss" not in r)
    head4 = handle.attachment.heads.state_dict()
    assert all(not torch.equal(head0[k], head4[k]) for k in head0)  # the head is trained
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert set(load_file(ckpt / "vlm_preserve_heads.safetensors")) == {f"pre.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    assert saved(ckpt) and not any("vlm_preserve" in k for k in saved(ckpt))
    trainer.save_model(str(tmp_path / "export"))
    model.save_pretrained(str(tmp_path / "export2"))  # directly, while attached
    for d in ("export", "export2"):
        assert saved(tmp_path / d) and not any("vlm_preserve" in k for k in saved(tmp_path / d)), d
    reloaded = type(model).from_pretrained(str(tmp_path / "export"))
    assert not hasattr(reloaded, "vlm_preserve_heads")
    handle.detach()
    assert not hasattr(model, "vlm_preserve_heads") and type(trainer) is transformers.Trainer

    # Resume. transformers 5.23's Trainer reloads a VLM checkpoint with plain load_state_dict while
    # save_pretrained wrote the legacy key names, so the *model* weights are not restored (plain
    # transformers, without this plugin, resumes the same way). What the plugin owns is checked exactly:
    # the heads come back from the checkpoint's own file, and the run continues with the terms.
    model2 = build(kind)
    resumed = trainer_for(model2, kind, tmp_path / "resumed", save_strategy="steps")
    h2 = attach(resumed, "rdd,pre")
    resumed._load_from_checkpoint(str(ckpt))
    on_disk = load_file(ckpt / "vlm_preserve_heads.safetensors")
    for k, v in h2.attachment.heads.state_dict().items():
        assert torch.equal(v, on_disk[k].to(v.dtype)), k
    resumed.train(resume_from_checkpoint=str(ckpt))
    after = rows(resumed, 2)
    assert [r["step"] for r in after] == [3, 4]
    assert all(math.isfinite(r["pre_loss"]) for r in after if "pre_loss" in r)


def test_user_compute_loss_override_and_compute_loss_func(tmp_path):
    class MyTrainer(transformers.Trainer):
        calls = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            MyTrainer.calls += 1
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model = build("llava")
    t = trainer_for(model, "llava", tmp_path / "a", cls=MyTrainer)
    attach(t, "rdd,pre")
    t.train()
    assert MyTrainer.calls == 4 and sum("pre_loss" in r for r in rows(t)) == 3
    assert isinstance(t, MyTrainer)

    def ce(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum") / num_items_in_batch

    model = build("llava")
    t = trainer_for(model, "llava", tmp_path / "b", compute_loss_func=ce, gradient_accumulation_steps=2)
    handle = attach(t, "rdd,pre")
    t.train()
    assert all(math.isfinite(r["pre_loss"]) for r in rows(t) if "pre_loss" in r)
    # compute_loss_func normalises over the accumulated batch, so the trainer does not divide by the
    # accumulation steps: the plugin divides its own per-micro-batch terms instead.
    batch = make_batch(model, "llava")
    t.current_gradient_accumulation_steps = 2
    n = (batch["labels"][:, 1:] != -100).sum()
    t._vp_logs = {}
    loss = t.compute_loss(model, dict(batch), num_items_in_batch=n)
    (name, (s, c)), = [(k, v) for k, v in t._vp_logs.items() if k == "rdd_loss"]
    pre = t._vp_logs["pre_loss"][0]
    with torch.no_grad():
        lm = ce(model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"], n)
    assert loss.item() == pytest.approx(lm.item() + (1.0 * s.item() + 0.5 * pre.item()) / 2, rel=1e-4)
    handle.detach()


def test_trl_sft_example_runs_and_trains_the_head(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.syspath_prepend(str(ROOT / "scripts" / "transformers"))
    mod = runpy.run_path(str(ROOT / "scripts" / "transformers" / "trl_sft_llava.py"))
    result = mod["main"](["--out", str(tmp_path / "trl"), "--steps", "6"])
    logged = result["rows"]
    assert len(logged) == 6 and all(math.isfinite(r["rdd_loss"]) and math.isfinite(r["pre_loss"]) for r in logged)
    assert json.loads((tmp_path / "trl" / "vlm_preserve_log.json").read_text())[0]["step"] == 1
    assert not any("vlm_preserve" in k for k in saved(tmp_path / "trl"))
    # the terms carry gradient through TRL's fused loss path: PRe falls as its head learns
    assert logged[-1]["pre_loss"] < logged[0]["pre_loss"]


def test_generic_adapter_example_with_token_or_mask_marking(tmp_path):
    mod = runpy.run_path(str(ROOT / "scripts" / "transformers" / "generic_trainer.py"))
    by_token = mod["main"](["--out", str(tmp_path / "token"), "--steps", "4"])["rows"]
    by_mask = mod["main"](["--out", str(tmp_path / "mask"), "--mark", "mask", "--steps", "4"])["rows"]
    assert len(by_token) == 4
    for a, b in zip(by_token, by_mask):  # the same positions, found two ways
        for k in ("loss", "lm_loss", "rdd_loss", "pre_loss"):
            if k in a or k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-6), (k, a, b)
    assert by_token[-1]["pre_loss"] < by_token[0]["pre_loss"]


def test_preserving_class_for_frameworks_that_build_their_own_trainer(tmp_path):
    """What docs/frameworks.md tells LLaMA-Factory users: rebind the trainer class their workflow constructs."""
    import types

    from vlm_preserve import preserving_class
    workflow = types.ModuleType("workflow")
    workflow.CustomTrainer = type("CustomTrainer", (transformers.Trainer,), {})
    original = workflow.CustomTrainer
    workflow.CustomTrainer = preserving_class(original, "rdd,pre")
    model = build("qwen2_vl")
    t = trainer_for(model, "qwen2_vl", tmp_path, cls=workflow.CustomTrainer)
    assert isinstance(t, original) and hasattr(model, "vlm_preserve_heads")
    t.train()
    assert sum("pre_loss" in r for r in rows(t)) == 3


def test_check_upstream_transformers():
    import subprocess
    p = subprocess.run([sys.executable, "-c", "from vlm_preserve.cli import entry; entry()", "check-upstream",
                        "transformers"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "declared symbols match" in p.stdout and "forward+backward with rdd,pre ran" in p.stdout


def test_trainer_with_none_attached_equals_plain_trainer(tmp_path):
    plain = trainer_for(build("llava"), "llava", tmp_path / "plain")
    plain.train()
    with_none = trainer_for(build("llava"), "llava", tmp_path / "none")
    attach(with_none, "none")
    with_none.train()
    assert [r["loss"] for r in rows(plain)] == [r["loss"] for r in rows(with_none)]
    assert all("lm_loss" not in r for r in rows(with_none))


def test_soft_label_under_num_items_normalisation_is_divided_like_the_trainer_would(tmp_path):
    from vlm_preserve.regularizers.soft_label import soft_label_loss
    model = build("llava")
    t = trainer_for(model, "llava", tmp_path, gradient_accumulation_steps=2)
    handle = attach(t, "soft_label")
    batch = make_batch(model, "llava")
    t.current_gradient_accumulation_steps = 2
    n = (batch["labels"][:, 1:] != -100).sum()
    assert t.model_accepts_loss_kwargs  # transformers then skips its own division by the accumulation steps
    loss = t.compute_loss(model, dict(batch), num_items_in_batch=n)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert loss.item() == pytest.approx(soft_label_loss(logits, batch["labels"], "uniform", 0.1).item() / 2, rel=1e-4)
    handle.detach()
