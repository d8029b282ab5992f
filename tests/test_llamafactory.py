"""llamafactory-train against the real LLaMA-Factory 0.9.5 (`.venv/llamafactory`): its own run_exp on tiny random
Qwen2-VL and LLaVA-hf checkpoints with processor folders and a sharegpt dataset with images and text-only samples."""
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

lf = pytest.importorskip("llamafactory", reason="LLaMA-Factory is not installed in this environment "
                                                "(scripts/setup_env.sh llamafactory)")
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vlm_preserve.cli.llamafactory_train import main  # noqa: E402
from vlm_preserve.testing.hf_vlm import build_tiny_hf_vlm  # noqa: E402

BIN = Path(sys.executable).parent
TEMPLATES = {"qwen2_vl": "qwen2_vl", "llava": "llava"}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    fx = build_tiny_hf_vlm(tmp_path_factory.mktemp("qwen"), "qwen2_vl")
    fx.dataset_dir = fx.write_llamafactory()
    return fx


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    fx = build_tiny_hf_vlm(tmp_path_factory.mktemp("llava"), "llava")
    fx.dataset_dir = fx.write_llamafactory()
    return fx


def config(fx, out, **over) -> dict:
    cfg = dict(model_name_or_path=str(fx.model), stage="sft", do_train=True, finetuning_type="full",
               dataset="tiny_mm", dataset_dir=str(fx.dataset_dir), template=TEMPLATES[fx.kind], cutoff_len=256,
               overwrite_cache=True, output_dir=str(out), overwrite_output_dir=True, logging_steps=1,
               save_strategy="no", plot_loss=False, per_device_train_batch_size=2, gradient_accumulation_steps=1,
               learning_rate=1e-3, max_steps=4, lr_scheduler_type="constant", bf16=False, report_to="none", seed=0,
               dataloader_num_workers=0, disable_tqdm=True, image_max_pixels=1024)
    cfg.update(over)
    return cfg


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def trainer_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "trainer_log.jsonl").read_text().splitlines()]


def state_rows(out) -> list[dict]:
    return [r for r in json.loads((Path(out) / "trainer_state.json").read_text())["log_history"] if "loss" in r]


def cli(*args, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", DISABLE_VERSION_CHECK="0")
    p = subprocess.run([*map(str, args)], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def run(fx, out, *, callbacks=(), **over) -> Path:
    path = write(config(fx, out, **{k: v for k, v in over.items()}), Path(str(out) + ".yaml"))
    assert main([str(path)], callbacks=list(callbacks)) == 0
    return Path(out)


def test_none_is_plain_llamafactory(qwen, tmp_path):
    """`llamafactory-train` with no regularizer is `llamafactory-cli train`: same losses, bit-identical weights."""
    plain = write(config(qwen, tmp_path / "plain"), tmp_path / "plain.yaml")
    ours = write(config(qwen, tmp_path / "ours"), tmp_path / "ours.yaml")
    cli(BIN / "llamafactory-cli", "train", plain)
    cli(BIN / "llamafactory-train", ours, "regularizer=none")
    for a, b in paired(state_rows(tmp_path / "plain"), state_rows(tmp_path / "ours")):
        assert a["loss"] == b["loss"]
    wa, wb = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("names", ["rdd", "pre", "rdd,pre"])
def test_terms_logged_and_reach_their_modules(qwen, tmp_path, names):
    """Each term is logged by name (trainer_state and LLaMA-Factory's trainer_log.jsonl), finite; its gradient
    changes the projector's (the merger's) gradient against a `none` run on the same batch, and PRe's head trains."""
    # LLaMA-Factory freezes the projector by default; trainable here, so RDD's reach into it shows
    # the first step's batch must have images (the term is 0 on a text-only one): the image-only dataset there
    base = GradProbe("visual.merger", "vlm_preserve_heads")
    run(qwen, tmp_path / "none", callbacks=[base.callback], max_steps=1, freeze_multi_modal_projector=False,
        dataset="tiny_mm_images")
    probe1 = GradProbe("visual.merger", "vlm_preserve_heads", "visual.blocks")
    run(qwen, tmp_path / "one", callbacks=[probe1.callback], max_steps=1, freeze_multi_modal_projector=False,
        dataset="tiny_mm_images", regularizer=names, **({"rdd_weight": 10.0} if "rdd" in names else {}))
    out = run(qwen, tmp_path / "run", regularizer=names)
    steps = [r for r in trainer_log(out) if "loss" in r]  # its last line is the run's summary
    assert [r["current_steps"] for r in steps] == [1, 2, 3, 4]
    for n in names.split(","):
        # a step whose batch had no image (LLaMA-Factory's fake image only) has no term to log
        logged = [r[f"{n}_loss"] for r in steps if f"{n}_loss" in r]
        assert len(logged) >= 2 and all(math.isfinite(v) for v in logged), steps
        assert [r[f"{n}_loss"] for r in state_rows(out) if f"{n}_loss" in r] == pytest.approx(logged)
    merger = [k for k in base.grads if "visual.merger" in k]
    assert merger and all(probe1.grads[k] is not None for k in merger)
    assert any(not torch.allclose(base.grads[k], probe1.grads[k]) for k in merger)
    assert all(v is None for k, v in probe1.grads.items() if "visual.blocks" in k)  # freeze_vision_tower (default)
    heads = [v for k, v in probe1.grads.items() if "vlm_preserve_heads" in k]
    assert bool(heads) == ("pre" in names)
    assert all(v is not None and v.abs().sum() > 0 for v in heads)
    saved = load_file(out / "model.safetensors")
    assert saved and not any("vlm_preserve_heads" in k for k in saved)


def test_fake_image_of_text_only_batch_is_not_visual(qwen, tmp_path):
    """LLaMA-Factory appends a fake 64x64 image to sample 0 of a batch without images, attention_mask 0 on its
    tokens: those tokens must not enter the terms as visual tokens (the mask is intersected with attention)."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    from vlm_preserve.adapters import TransformersAdapter
    from vlm_preserve.api import make_configs
    from vlm_preserve.attachment import Attachment

    model_args, data_args, training_args, finetuning_args, _ = get_train_args(config(qwen, tmp_path / "o"))
    tm = load_tokenizer(model_args)
    tok = tm["tokenizer"]
    template = get_template_and_fix_tokenizer(tok, data_args)
    model = load_model(tok, model_args, finetuning_args, is_trainable=True)
    collator = SFTDataCollatorWith4DAttentionMask(template=template, model=model, label_pad_token_id=-100,
                                                  pad_to_multiple_of=8, **tm)

    def feature(text, images=()):
        ids = tok.encode(text, add_special_tokens=False)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids, "images": list(images),
                "videos": [], "audios": []}

    att = Attachment(model, make_configs("rdd"), TransformersAdapter())
    image_id = model.config.image_token_id
    try:
        batch = collator([feature("red circle left"), feature("two small squares at the top")])
        assert (batch["input_ids"] == image_id).any(), "LLaMA-Factory no longer injects its fake image"
        att.begin_step()
        model(**batch, **att.forward_kwargs())
        cap = att.session.take()
        assert cap is not None and int(cap.image_mask.sum()) == 0
        # a real image in the batch: its tokens are visual
        img = next(r["images"][0] for r in qwen.records if r["images"])
        msgs = template.mm_plugin.process_messages([{"role": "user", "content": "<image>red"}], [img], [], [],
                                                   tm["processor"])
        batch = collator([feature(msgs[0]["content"], [img]), feature("blue")])
        att.begin_step()
        model(**batch, **att.forward_kwargs())
        cap = att.session.take()
        n_visual = int(((batch["input_ids"] == image_id) & batch["attention_mask"].bool()).sum())
        assert n_visual > 0 and int(cap.image_mask.sum()) == n_visual
    finally:
        att.detach()


def test_distill_llava_hf_and_refusal_for_qwen(llava, qwen, tmp_path):
    out = run(llava, tmp_path / "d", regularizer="distill", distill_teacher=str(llava.llm), max_steps=2)
    logged = [r["distill_loss"] for r in trainer_log(out) if "distill_loss" in r]
    assert logged and all(math.isfinite(v) for v in logged)
    cfg = write(config(qwen, tmp_path / "q"), tmp_path / "q.yaml")
    p = cli(BIN / "llamafactory-train", cfg, "--regularizer", "distill", check=False)
    assert p.returncode != 0 and "needs the original LLM" in p.stderr
    p = cli(BIN / "llamafactory-train", cfg, "--regularizer", "distill", "--distill_teacher", qwen.llm, check=False)
    assert p.returncode != 0 and "M-RoPE" in p.stderr


def test_lora_export_has_no_heads_and_loads(llava, tmp_path):
    """LoRA with rdd,pre: the adapter and LLaMA-Factory's merged export carry no head; the export loads."""
    from llamafactory.train.tuner import export_model
    from transformers import AutoModelForImageTextToText

    out = run(llava, tmp_path / "lora", finetuning_type="lora", lora_target="all", regularizer="rdd,pre",
              dataset="tiny_mm_images",
              max_steps=2)
    assert [r for r in trainer_log(out) if "pre_loss" in r]
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and not any("vlm_preserve_heads" in k for k in adapter)
    export_model(dict(model_name_or_path=str(llava.model), adapter_name_or_path=str(out), template="llava",
                      finetuning_type="lora", export_dir=str(tmp_path / "merged")))
    merged = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(load_file(f))
    assert merged and not any("vlm_preserve_heads" in k or "lora" in k for k in merged)
    AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")


def test_freeze_tuning_and_the_saved_model_loads(qwen, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = run(qwen, tmp_path / "f", finetuning_type="freeze", freeze_trainable_layers=1, regularizer="rdd,pre",
              max_steps=2, dataset="tiny_mm_images")
    assert len([r for r in trainer_log(out) if "rdd_loss" in r and "pre_loss" in r]) == 2
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert not hasattr(model, "vlm_preserve_heads")


def test_torchrun_two_processes(qwen, tmp_path):
    """FORCE_TORCHRUN=1 (what several GPUs imply): the command re-runs itself per process under torchrun, as
    llamafactory-cli does; both ranks compute the terms (gloo on CPU)."""
    cfg = write(config(qwen, tmp_path / "ddp", dataset="tiny_mm_images", max_steps=2, ddp_backend="gloo"),
                tmp_path / "ddp.yaml")
    env = dict(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run([str(BIN / "llamafactory-train"), str(cfg), "regularizer=rdd,pre"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONWARNINGS="ignore", **env))
    assert p.returncode == 0, p.stderr[-4000:]
    assert "world size: 2" in p.stdout + p.stderr
    rows = [r for r in trainer_log(tmp_path / "ddp") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["rdd_loss"]) and math.isfinite(r["pre_loss"]) for r in rows)


def test_check_upstream():
    p = cli(BIN / "vlm-preserve", "check-upstream", "llamafactory")
    assert "declared symbols match" in p.stdout and "terms finite" in p.stdout


def test_resume_restores_heads(qwen, tmp_path):
    """Resumed from checkpoint-2, training starts from the heads saved there (not fresh ones), and goes on saving
    them. (Not compared with the uninterrupted run's step 4: transformers 5.x's Trainer does not reload a VLM's
    weights on resume — its log lists every model key as missing — so the two runs differ from step 3 on.)"""
    full = run(qwen, tmp_path / "a", regularizer="pre", save_strategy="steps", save_steps=2)
    b = tmp_path / "b"
    saved = saved_heads_copied(full, b)
    callback, seen = heads_at_start()
    run(qwen, b, callbacks=[callback], regularizer="pre", save_strategy="steps", save_steps=2,
        overwrite_output_dir=False, resume_from_checkpoint=str(b / "checkpoint-2"))
    assert_resumed_from(seen, saved, b)


def test_refusals(qwen, tmp_path):
    cfg = write(config(qwen, tmp_path / "x", stage="dpo"), tmp_path / "x.yaml")
    p = cli(BIN / "llamafactory-train", cfg, "regularizer=rdd", check=False)
    assert p.returncode == 2 and "stage 'dpo' is not supported" in p.stderr
    cfg = write(config(qwen, tmp_path / "y"), tmp_path / "y.yaml")
    p = cli(BIN / "llamafactory-train", cfg, "--regularizer", "rdd,nope", check=False)
    assert p.returncode == 2 and "nope" in p.stderr
    p = cli(BIN / "llamafactory-train", cfg, "regularizer=attention_tuning", "finetuning_type=lora", check=False)
    assert p.returncode == 2 and "finetuning_type: full" in p.stderr


@pytest.mark.parametrize("name", ["qwen2_5vl_full_sft_rdd.yaml", "llava1_5_full_sft_rdd.yaml"])
def test_example_configs_parse(name, monkeypatch):
    """scripts/llamafactory/: our keys are taken out; every other key is one LLaMA-Factory knows."""
    from llamafactory.hparams.parser import _TRAIN_ARGS

    from vlm_preserve.cli.llamafactory_train import split_arguments

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    configs, _, names, _, theirs = split_arguments([f"scripts/llamafactory/{name}"])
    assert names and "regularizer" not in theirs
    assert Path(theirs.pop("deepspeed")).exists()  # (its parsing needs deepspeed, not installed here)
    unknown = set(theirs) - {f for cls in _TRAIN_ARGS for f in cls.__dataclass_fields__}
    assert not unknown
