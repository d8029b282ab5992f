"""ms-swift 4.5.3 (`.venv/swift`): real `swift sft` runs with the plugin through ms-swift's own `--external_plugins`
(options in VLM_PRESERVE) and through `swift-sft`, on tiny random Qwen2-VL (Qwen's special-token ids, which ms-swift's
template hard-codes) and LLaVA-hf checkpoints with processor folders, and a jsonl dataset with images and text-only
samples."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import paired
from helpers.grad_probe import GradProbe
from helpers.resume_heads import assert_resumed_from, heads_at_start, saved_heads_copied

swift = pytest.importorskip("swift", reason="ms-swift is not installed in this environment (scripts/setup_env.sh swift)")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vlm_preserve.frameworks.swift import ENV, plugin_path, register  # noqa: E402
from vlm_preserve.testing.hf_vlm import build_tiny_hf_vlm  # noqa: E402

BIN = Path(sys.executable).parent
MODEL_TYPES = {"qwen2_vl": ["--model_type", "qwen2_vl", "--template", "qwen2_vl"],
               "llava": ["--model_type", "llava1_5_hf"]}


def _fixture(root, kind):
    fx = build_tiny_hf_vlm(root, kind, qwen_ids=kind == "qwen2_vl")
    fx.dataset = fx.write_swift()
    fx.images_only = root / "swift_images.jsonl"
    fx.images_only.write_text("".join(json.dumps(r) + "\n" for r in fx.records if r["images"]))
    return fx


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return _fixture(tmp_path_factory.mktemp("qwen"), "qwen2_vl")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return _fixture(tmp_path_factory.mktemp("llava"), "llava")


def sft_args(fx, out, **over) -> list[str]:
    opts = dict(model=fx.model, dataset=fx.dataset, output_dir=out, add_version="false", check_model="false",
                report_to="none", torch_dtype="float32", tuner_type="full", max_steps=4, per_device_train_batch_size=2,
                gradient_accumulation_steps=1, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", gradient_checkpointing="false", split_dataset_ratio=0, dataloader_num_workers=0,
                dataloader_persistent_workers="false", max_pixels=1024, seed=0, disable_tqdm="true")
    opts.update(over)
    return MODEL_TYPES[fx.kind] + [x for k, v in opts.items() for x in (f"--{k}", str(v))]


def cli(*args, vlm_preserve=None, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env.pop(ENV, None)
    if vlm_preserve is not None:
        env[ENV] = vlm_preserve
    p = subprocess.run([*map(str, args)], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def steps(out) -> list[dict]:
    rows = [json.loads(line) for line in (Path(out) / "logging.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture
def in_process(monkeypatch):
    """Runs `swift sft` in this process (for callbacks that read gradients and heads), the plugin registered from
    `flags` as its --external_plugins file would; ms-swift's trainer mapping and callbacks restored afterwards."""
    from swift.callbacks import callbacks_map
    from swift.pipelines import sft_main
    from swift.trainers import TrainerFactory

    monkeypatch.setitem(TrainerFactory.TRAINER_MAPPING, "causal_lm", TrainerFactory.TRAINER_MAPPING["causal_lm"])

    def go(args: list[str], flags: str = "", callbacks=()):
        register({ENV: flags})
        names = []
        for i, cb in enumerate(callbacks):
            monkeypatch.setitem(callbacks_map, f"vp_test_{i}", lambda args, trainer, cb=cb: cb)
            names.append(f"vp_test_{i}")
        sft_main(args + (["--callbacks", *names] if names else []))
    return go


def test_none_is_plain_swift(qwen, tmp_path):
    """`swift-sft --regularizer none`, and the plugin file with nothing enabled, leave `swift sft` as it is: same
    losses, bit-identical weights."""
    save = dict(save_strategy="steps", save_steps=4, save_only_model="true")
    cli(BIN / "swift", "sft", *sft_args(qwen, tmp_path / "plain", **save))
    cli(BIN / "swift-sft", *sft_args(qwen, tmp_path / "none", **save), "--regularizer", "none")
    cli(BIN / "swift", "sft", *sft_args(qwen, tmp_path / "plugin", **save), "--external_plugins", plugin_path(),
        vlm_preserve="--regularizer none")
    ref = load_file(tmp_path / "plain" / "checkpoint-4" / "model.safetensors")
    for other in ("none", "plugin"):
        rows = list(paired(steps(tmp_path / "plain"), steps(tmp_path / other)))
        assert len(rows) == 4 and all(a["loss"] == b["loss"] for a, b in rows)
        w = load_file(tmp_path / other / "checkpoint-4" / "model.safetensors")
        assert w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in ref)


@pytest.mark.parametrize("names", ["rdd", "pre", "rdd,pre"])
def test_terms_logged_and_reach_their_modules(qwen, tmp_path, in_process, names):
    """Through `swift sft --external_plugins`: each term logged by name in ms-swift's logging.jsonl, finite, the
    model saved without heads. In process, on one batch with images: the term changes the merger's gradient against
    a `none` run (the merger trains: --freeze_aligner false), the vision blocks stay frozen, PRe's head trains."""
    out = tmp_path / "run"
    cli(BIN / "swift", "sft", *sft_args(qwen, out, save_strategy="steps", save_steps=4), "--external_plugins",
        plugin_path(), vlm_preserve=f"--regularizer {names}")
    rows = steps(out)
    assert [r["global_step/max_steps"] for r in rows] == ["1/4", "2/4", "3/4", "4/4"]
    for n in names.split(","):
        logged = [r[f"{n}_loss"] for r in rows if f"{n}_loss" in r]  # a batch without images has no term
        assert len(logged) >= 2 and all(math.isfinite(v) for v in logged), rows
    assert all(r["loss"] == pytest.approx(r["lm_loss"] + sum(r.get(f"{n}_loss", 0.0) * w for n, w in
                                          (("rdd", 1.0), ("pre", 0.5)) if n in names.split(",")), rel=1e-4)
               for r in rows)
    saved = load_file(out / "checkpoint-4" / "model.safetensors")
    assert saved and not any("vlm_preserve_heads" in k for k in saved)

    one = dict(dataset=qwen.images_only, max_steps=1, freeze_aligner="false")
    base = GradProbe("visual.merger", "vlm_preserve_heads")
    in_process(sft_args(qwen, tmp_path / "none", **one), callbacks=[base.callback])
    probe = GradProbe("visual.merger", "vlm_preserve_heads", "visual.blocks")
    flags = f"--regularizer {names}" + (" --rdd_weight 10" if "rdd" in names else "")
    in_process(sft_args(qwen, tmp_path / "one", **one), flags, callbacks=[probe.callback])
    merger = [k for k in base.grads if "visual.merger" in k]
    assert merger and all(probe.grads[k] is not None for k in merger)
    assert any(not torch.allclose(base.grads[k], probe.grads[k]) for k in merger)
    assert all(v is None for k, v in probe.grads.items() if "visual.blocks" in k)  # --freeze_vit (default)
    heads = [v for k, v in probe.grads.items() if "vlm_preserve_heads" in k]
    assert bool(heads) == ("pre" in names)
    assert all(v is not None and v.abs().sum() > 0 for v in heads)


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_dummy_image_of_text_only_batch_is_not_visual(qwen, tmp_path, in_process, monkeypatch, tuner):
    """ms-swift's Qwen2-VL template replaces input_ids by inputs_embeds in a forward pre-hook on the trained model,
    and runs a dummy 32x32 image through the vision tower on a batch without images. Under LoRA that hook sits on
    the PEFT wrapper, so the VLM's own hooks never see input_ids. Every step still gets a capture (ids from the
    trainer's own batch), and its image mask is exactly the batch's <|image_pad|> tokens: none on the text-only
    batch, the real image's tokens on the mixed one."""
    from vlm_preserve.capture import CaptureSession

    text = [r for r in qwen.records if not r["images"]]
    image = [r for r in qwen.records if r["images"]]
    data = tmp_path / "ordered.jsonl"   # batch 1: two text-only samples; batch 2: an image and a text sample
    data.write_text("".join(json.dumps(r) + "\n" for r in (text[0], text[1], image[0], text[2])))
    image_id = json.loads((qwen.model / "config.json").read_text())["image_token_id"]
    seen = []
    take = CaptureSession.take

    def recording_take(self):
        batch = dict(self.batch)
        cap = take(self)
        expected = (batch["input_ids"] == image_id)
        if batch.get("attention_mask") is not None:
            expected &= batch["attention_mask"].bool()
        seen.append((cap, int(expected.sum())))
        return cap

    monkeypatch.setattr(CaptureSession, "take", recording_take)
    in_process(sft_args(qwen, tmp_path / "o", dataset=data, max_steps=2, dataset_shuffle="false",
                        train_dataloader_shuffle="false", tuner_type=tuner), "--regularizer rdd,pre")
    assert len(seen) == 2 and all(cap is not None for cap, _ in seen)
    assert [int(cap.image_mask.sum()) for cap, _ in seen] == [n for _, n in seen]
    assert seen[0][1] == 0 and seen[1][1] > 0


def test_distill_llava_hf_and_refusal_for_qwen(llava, qwen, tmp_path):
    """distill on LLaVA-hf through swift-sft (full logits: ms-swift's logits_to_keep turned off for it); refused
    for Qwen2-VL (M-RoPE) before training."""
    out = tmp_path / "d"
    p = cli(BIN / "swift-sft", *sft_args(llava, out), "--regularizer", "distill", "--distill_teacher", llava.llm)
    assert "[vlm-preserve] use_logits_to_keep: False (distill" in p.stdout + p.stderr
    logged = [r["distill_loss"] for r in steps(out) if "distill_loss" in r]
    assert logged and all(math.isfinite(v) for v in logged)
    p = cli(BIN / "swift-sft", *sft_args(qwen, tmp_path / "q"), "--regularizer", "distill", "--distill_teacher",
            qwen.llm, check=False)
    assert p.returncode != 0 and "M-RoPE" in p.stderr
    assert not (tmp_path / "q" / "logging.jsonl").exists() or not steps(tmp_path / "q")


def test_lora_export_has_no_heads_and_loads(llava, tmp_path):
    """LoRA with rdd,pre: the adapter checkpoint and ms-swift's merged export carry no head; the export loads."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "lora"
    cli(BIN / "swift-sft", *sft_args(llava, out, tuner_type="lora", target_modules="all-linear", max_steps=2,
                                     dataset=llava.images_only, save_strategy="steps", save_steps=2),
        "--regularizer", "rdd,pre")
    assert [r for r in steps(out) if "pre_loss" in r and "rdd_loss" in r]
    ckpt = out / "checkpoint-2"
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and not any("vlm_preserve_heads" in k for k in adapter)
    assert (ckpt / "vlm_preserve_heads.safetensors").exists()
    merged = tmp_path / "merged"
    cli(BIN / "swift", "export", "--adapters", ckpt, "--merge_lora", "true", "--output_dir", merged)
    weights = {}
    for f in merged.glob("*.safetensors"):
        weights.update(load_file(f))
    assert weights and not any("vlm_preserve_heads" in k or "lora" in k for k in weights)
    AutoModelForImageTextToText.from_pretrained(merged)


def test_resume_restores_heads(qwen, tmp_path, in_process):
    """Resumed from checkpoint-2, training starts from the heads saved there, and goes on saving them."""
    save = dict(save_strategy="steps", save_steps=2)
    full, b = tmp_path / "a", tmp_path / "b"
    in_process(sft_args(qwen, full, **save), "--regularizer pre")
    saved = saved_heads_copied(full, b)
    callback, seen = heads_at_start()
    in_process(sft_args(qwen, b, resume_from_checkpoint=b / "checkpoint-2", **save), "--regularizer pre",
               callbacks=[callback])
    assert_resumed_from(seen, saved, b)


def test_refusals(qwen, tmp_path):
    p = cli(BIN / "swift-sft", *sft_args(qwen, tmp_path / "x"), "--regularizer", "rdd,nope", check=False)
    assert p.returncode == 2 and "nope" in p.stderr
    p = cli(BIN / "swift", "sft", *sft_args(qwen, tmp_path / "y"), "--external_plugins", plugin_path(),
            vlm_preserve="--regularizer rdd --max_steps 3", check=False)
    assert p.returncode != 0 and "not vlm-preserve flags" in p.stderr
    p = cli(BIN / "swift-sft", *sft_args(qwen, tmp_path / "z"), "--pre_weight", "0.3", check=False)
    assert p.returncode == 2 and "pre" in p.stderr


def test_check_upstream():
    p = cli(BIN / "vlm-preserve", "check-upstream", "swift")
    assert "declared symbols match" in p.stdout and "terms finite" in p.stdout


@pytest.mark.parametrize("name", ["qwen2_5vl_full_sft_rdd.sh", "llava1_5_hf_full_sft_rdd.sh"])
def test_example_commands_parse(name):
    """scripts/swift/: every flag is the plugin's or one of ms-swift's SFT arguments."""
    import shlex

    from swift.arguments import SftArguments

    from vlm_preserve.options import option_names

    text = (Path(__file__).resolve().parents[1] / "scripts" / "swift" / name).read_text().replace("\\\n", " ")
    words = [w for line in text.splitlines() if "swift-sft" in line for w in shlex.split(line)]
    flags = {w[2:].split("=", 1)[0] for w in words if w.startswith("--")}
    assert "regularizer" in flags
    unknown = flags - set(option_names()) - set(SftArguments.__dataclass_fields__)
    assert not unknown
