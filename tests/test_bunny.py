"""Upstream Bunny's real `train()` through `bunny-train`, on tiny phi-2 and Qwen1.5 fixtures.

Bunny is not on PyPI: these tests run where a checkout is given (VLM_PRESERVE_BUNNY_SRC, see
third_party/bunny/README.md; scripts/test.sh then builds the bunny environment) and skip elsewhere."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import bunny.train.train  # noqa: F401
except ModuleNotFoundError as e:
    # Only a missing `bunny` means "no checkout here"; in the bunny environment nothing may be skipped.
    if os.environ.get("VLM_PRESERVE_TEST_ENV") == "bunny" or e.name != "bunny":
        raise
    pytest.skip("no Bunny checkout in this environment: set VLM_PRESERVE_BUNNY_SRC to a checkout of "
                "BAAI-DCAI/Bunny@08273ac (scripts/fetch_upstreams.sh) and run scripts/test.sh", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from vlm_preserve.testing.fixtures import bunny_train_args, build_tiny_bunny  # noqa: E402
from conftest import paired, step_rows as rows  # noqa: E402

MODEL_TYPES = ["phi-2", "qwen1.5-1.8b"]


@pytest.fixture(scope="session", params=MODEL_TYPES)
def fx(request, tmp_path_factory):
    return build_tiny_bunny(tmp_path_factory.mktemp(request.param.replace(".", "")), request.param)


def run(kind, args, check=True):
    code = ("import sys, torch; torch.manual_seed(0); sys.argv = ['train'] + sys.argv[1:]; " +
            ("from vlm_preserve.cli.bunny_train import main; main(sys.argv[1:])" if kind == "plugin"
             else "from bunny.train.train import train; train()"))
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if check and p.returncode != 0:
        raise AssertionError(f"{kind} run failed:\n{p.stderr[-4000:]}")
    return p


def weights(path):
    out = {}
    for f in Path(path).glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_none_is_bit_identical_to_plain_upstream(fx, tmp_path):
    run("upstream", bunny_train_args(fx, tmp_path / "up"))
    run("plugin", bunny_train_args(fx, tmp_path / "pl") + ["--regularizer", "none"])
    assert [r["loss"] for r in rows(tmp_path / "up")] == [r["loss"] for r in rows(tmp_path / "pl")]
    a, b = weights(tmp_path / "up"), weights(tmp_path / "pl")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("reg,terms", [("rdd", ["rdd_loss"]), ("pre", ["pre_loss"]), ("rdd,pre", ["rdd_loss", "pre_loss"]),
                                       ("rdd,pre,distill", ["rdd_loss", "pre_loss", "distill_loss"])])
def test_regularizers_train_log_and_stay_out_of_the_export(fx, tmp_path, reg, terms):
    p = run("plugin", bunny_train_args(fx, tmp_path) + ["--regularizer", reg]
            + (["--distill_route", "all"] if "distill" in reg else []))
    assert "tokenization mismatch" not in p.stdout + p.stderr
    logged = rows(tmp_path)
    assert len(logged) == 4 and all(r["lm_loss"] > 1.0 for r in logged)
    assert all(math.isfinite(r[t]) for r in logged for t in terms)
    final = weights(tmp_path)
    assert final and not any("vlm_preserve" in k for k in final)


def test_gradient_checkpointing_on_equals_off(fx, tmp_path):
    for gc in ("False", "True"):
        run("plugin", bunny_train_args(fx, tmp_path / gc, gradient_checkpointing=gc) + ["--regularizer", "rdd,pre"])
    for a, b in paired(rows(tmp_path / "False"), rows(tmp_path / "True")):
        for k in ("loss", "lm_loss", "rdd_loss", "pre_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a, b)


def test_resume_equals_uninterrupted(fx, tmp_path):
    import shutil
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)
    run("plugin", bunny_train_args(fx, tmp_path / "full", **args) + ["--regularizer", "rdd,pre"])
    (tmp_path / "res").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "res" / "checkpoint-3")
    run("plugin", bunny_train_args(fx, tmp_path / "res", **args) + ["--regularizer", "rdd,pre"])
    a = [r for r in rows(tmp_path / "full") if r["step"] > 3]
    b = [r for r in rows(tmp_path / "res") if r["step"] > 3]
    assert [r["step"] for r in b] == [4, 5, 6]
    for x, y in paired(a, b):
        for k in ("loss", "rdd_loss", "pre_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x, y)


def test_image_mask_is_where_bunny_placed_the_image_features(fx):
    """In-process, with Bunny's own classes, dataset and collator: the recovered mask selects exactly the
    projector outputs, the text positions are the embedded text tokens, and pre_proj's rows are the vision
    tower's features in order, although Bunny rewrites input_ids in place (-200 -> 0) during the call."""
    import transformers
    from bunny import conversation as conversation_lib
    from bunny.model import BunnyPhiForCausalLM, BunnyQwen2ForCausalLM
    from bunny.train.train import ModelArguments
    from bunny.util.data_utils import DataArguments, make_supervised_data_module

    from vlm_preserve.adapters import LlavaAdapter
    from vlm_preserve.capture import CaptureSession
    adapter = LlavaAdapter()

    cls = BunnyPhiForCausalLM if fx.model_type == "phi-2" else BunnyQwen2ForCausalLM
    torch.manual_seed(0)
    model = cls.from_pretrained(fx.llm)
    tok = transformers.AutoTokenizer.from_pretrained(fx.llm, model_max_length=128, padding_side="right", use_fast=True)
    tok.pad_token = tok.unk_token
    conversation_lib.default_conversation = conversation_lib.conv_templates["bunny"]
    model.get_model().initialize_vision_modules(model_args=ModelArguments(
        model_name_or_path=str(fx.llm), model_type=fx.model_type, vision_tower=str(fx.vision)))
    data_args = DataArguments(data_path=str(fx.data), lazy_preprocess=True, image_folder=str(fx.images),
                              image_aspect_ratio="pad")
    data_args.image_processor = model.get_vision_tower().image_processor
    data_args.is_multimodal = True
    model.config.tokenizer_padding_side, model.config.tokenizer_model_max_length = "right", 128
    module = make_supervised_data_module(tokenizer=tok, data_args=data_args)
    ds = module["train_dataset"]
    idx = [i for i, r in enumerate(ds.list_data_dict) if "image" in r][:3] + \
          [i for i, r in enumerate(ds.list_data_dict) if "image" not in r][:2]
    batch = module["data_collator"]([ds[i] for i in idx])
    has_image = (batch["input_ids"] == -200).any(1)
    slot = CaptureSession()
    with adapter.install_capture(model, slot, visual_features=True):
        model(**batch)
    cap = slot.capture
    assert not (batch["input_ids"] == -200).any()  # Bunny did mutate the caller's ids ...
    with torch.no_grad():
        feats = model.encode_images(batch["images"][has_image])
        vt = model.get_vision_tower()(batch["images"][has_image])
    torch.testing.assert_close(cap.visual_embeds(), feats.reshape(-1, feats.shape[-1]))
    torch.testing.assert_close(cap.visual_features, vt.reshape(-1, vt.shape[-1]))  # ... the order held anyway
    assert cap.image_mask.sum(1).tolist() == [feats.shape[1] if h else 0 for h in has_image.tolist()]
    names = [type(m).__name__ for m in adapter.llm_modules(model)]
    assert len(names) == 4  # embed, layers, final norm (Phi: final_layernorm), lm_head


def _checkout() -> Path:
    import bunny
    return Path(list(bunny.__path__)[0]).resolve().parent  # a namespace package: no __init__.py


def vlm_preserve(*args):
    return subprocess.run([sys.executable, "-c", "from vlm_preserve.cli import entry; entry()", *args],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_check_upstream_passes_on_the_pinned_checkout():
    p = vlm_preserve("check-upstream", "bunny", "--source", str(_checkout()))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "declared symbols match" in p.stdout and "forward+backward with rdd,pre ran" in p.stdout


def test_check_upstream_names_drift_in_a_doctored_checkout(tmp_path):
    import shutil
    shutil.copytree(_checkout() / "bunny", tmp_path / "bunny")
    arch = tmp_path / "bunny" / "model" / "bunny_arch.py"
    text = arch.read_text()
    assert "past_key_values, labels, images\n" in text
    arch.write_text(text.replace("past_key_values, labels, images\n", "past_key_values, labels, pixel_values\n", 1))
    p = vlm_preserve("check-upstream", "bunny", "--source", str(tmp_path), "--skip-run")
    assert p.returncode == 1
    assert "DRIFT bunny.model.bunny_arch:BunnyMetaForCausalLM.prepare_inputs_labels_for_multimodal" in p.stderr
    assert "pixel_values" in p.stderr and f"source tree {tmp_path}" in p.stderr and "'upstream_commit': '08273ac'" in p.stderr
    # the untouched copy passes
    arch.write_text(text)
    assert vlm_preserve("check-upstream", "bunny", "--source", str(tmp_path), "--skip-run").returncode == 0


@pytest.mark.parametrize("reg,lora", [("rdd,pre", "0"), ("pre", "1"), ("soft_label", "0")])
def test_launch_script_flags_are_all_known(reg, lora):
    import shlex

    import transformers
    from bunny.train import train as upstream

    from vlm_preserve.frameworks.bunny import SPEC
    from vlm_preserve.cli.launch import _parser
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(["bash", root / "scripts" / "bunny" / "finetune.sh", reg], capture_output=True, text=True,
                       env=dict(os.environ, DRY_RUN="1", BUNNY_TRAIN="bunny-train", LORA=lora))
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout)
    args = words[words.index("bunny-train") + 1:]
    ours, rest = _parser(SPEC).parse_known_args(args)
    assert ours.regularizer == reg
    up = transformers.HfArgumentParser((upstream.ModelArguments, upstream.DataArguments, upstream.TrainingArguments))
    assert up.parse_known_args(rest)[1] == []
