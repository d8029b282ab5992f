"""Upstream NVILA's real `llava/train/train_mem.py` through `nvila-train`, on a tiny Qwen2 + SigLIP +
mlp_downsample fixture, with NVILA's packed path (training packs each batch into one row).

NVILA is not on PyPI: these tests run where a checkout is given (VLM_PRESERVE_NVILA_SRC, see
third_party/nvila/README.md; scripts/test.sh then builds the nvila environment) and skip elsewhere. No GPU here:
every run, plugin and upstream alike, uses `--cpu_compat` (sdpa, float32, a one-process gloo group)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import llava.train.args  # noqa: F401  (NVILA has it, upstream LLaVA does not)
    import llava.train.train  # noqa: F401
except ModuleNotFoundError as e:
    # Only a missing NVILA `llava` (none at all, or upstream LLaVA's without llava.train.args) means "no checkout
    # here"; in the nvila environment nothing may be skipped.
    if os.environ.get("VLM_PRESERVE_TEST_ENV") == "nvila" or e.name not in ("llava", "llava.train.args"):
        raise
    pytest.skip(f"no NVILA checkout in this environment ({e}): set VLM_PRESERVE_NVILA_SRC to a checkout of "
                "NVlabs/VILA@b760c34 (scripts/fetch_upstreams.sh) and run scripts/test.sh", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from vlm_preserve.testing.fixtures import build_tiny_nvila, nvila_train_args  # noqa: E402
from conftest import paired, step_rows as rows  # noqa: E402

UPSTREAM = ("from vlm_preserve.frameworks.nvila import cpu_compat; from vlm_preserve.patching import Patches; "
            "import runpy; cpu_compat(Patches()); "
            "runpy.run_module('llava.train.train_mem', run_name='__main__', alter_sys=False)")
PLUGIN = "from vlm_preserve.cli.nvila_train import main; main(sys.argv[1:] + ['--cpu_compat', 'True'])"


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    return build_tiny_nvila(tmp_path_factory.mktemp("nvila"))


def run(fx, kind, args, prelude=""):
    code = "import sys, torch; torch.manual_seed(0); sys.argv = ['train_mem.py'] + sys.argv[1:]; " + prelude + \
           (PLUGIN if kind == "plugin" else UPSTREAM)
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore", VILA_DATASETS=str(fx.registry),
                                WANDB_MODE="disabled"))
    if p.returncode != 0:
        raise AssertionError(f"{kind} run failed:\n{p.stderr[-4000:]}")
    return p


def weights(path):
    out = {}
    for f in Path(path).rglob("*.safetensors"):
        out.update({f"{f.parent.relative_to(path)}/{k}": v for k, v in load_file(f).items()})
    return out


def test_none_is_bit_identical_to_plain_upstream(fx, tmp_path):
    run(fx, "upstream", nvila_train_args(fx, tmp_path / "up"))
    run(fx, "plugin", nvila_train_args(fx, tmp_path / "pl") + ["--regularizer", "none"])
    assert [r["loss"] for r in rows(tmp_path / "up")] == [r["loss"] for r in rows(tmp_path / "pl")]
    a, b = weights(tmp_path / "up"), weights(tmp_path / "pl")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("reg,terms", [("rdd", ["rdd_loss"]), ("pre", ["pre_loss"]), ("rdd,pre", ["rdd_loss", "pre_loss"])])
def test_regularizers_train_log_and_heads_stay_out_of_llm(fx, tmp_path, reg, terms):
    run(fx, "plugin", nvila_train_args(fx, tmp_path, save_strategy="steps", save_steps=3) + ["--regularizer", reg])
    logged = rows(tmp_path)
    assert len(logged) == 3 and all(r["lm_loss"] > 1.0 for r in logged)
    assert all(math.isfinite(r[t]) and r[t] != 0 for r in logged for t in terms)
    for out in (tmp_path, tmp_path / "checkpoint-3"):
        saved = weights(out)
        assert any(k.startswith("llm/") for k in saved) and any(k.startswith("mm_projector/") for k in saved)
        assert not any("vlm_preserve" in k for k in saved)  # not in llm/ nor anywhere else in NVILA's export
    heads = tmp_path / "checkpoint-3" / "vlm_preserve_heads.safetensors"
    assert heads.exists() == ("pre" in reg)  # PRe's head is kept beside the checkpoint, for resuming
    if "pre" in reg:
        assert load_file(heads)


def test_terms_reach_the_gradients(fx, tmp_path):
    """Same seed, same data: the projector's weights after training differ with RDD (its gradient reaches the
    projector) — and the LLM's with PRe."""
    run(fx, "plugin", nvila_train_args(fx, tmp_path / "off") + ["--regularizer", "none"])
    run(fx, "plugin", nvila_train_args(fx, tmp_path / "rdd") + ["--regularizer", "rdd", "--rdd_weight", "5"])
    run(fx, "plugin", nvila_train_args(fx, tmp_path / "pre") + ["--regularizer", "pre", "--pre_weight", "5"])
    off, rdd, pre = (weights(tmp_path / n) for n in ("off", "rdd", "pre"))
    proj = [k for k in off if k.startswith("mm_projector/")]
    assert any(not torch.equal(off[k], rdd[k]) for k in proj)
    early = [k for k in off if k.startswith("llm/") and ".layers.0." in k]
    assert early and any(not torch.equal(off[k], pre[k]) for k in early)


def test_gradient_checkpointing_on_equals_off(fx, tmp_path):
    for gc in ("False", "True"):
        run(fx, "plugin", nvila_train_args(fx, tmp_path / gc, gradient_checkpointing=gc) + ["--regularizer", "rdd,pre"])
    for a, b in paired(rows(tmp_path / "False"), rows(tmp_path / "True")):
        for k in ("loss", "lm_loss", "rdd_loss", "pre_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a, b)


MASK_PROBE = """
import json, torch
import vlm_preserve.adapters.nvila as ad
from vlm_preserve.attachment import Attachment
seen, caps, checks = [], [], []
install = ad.NVILAAdapter.install_capture
def probe(self, model, session, **kw):
    p = install(self, model, session, **kw)
    vlm = ad.find_nvila(model)
    p.add_hook(vlm.mm_projector.register_forward_hook(lambda m, a, out: seen.append(out.detach())))
    return p
ad.NVILAAdapter.install_capture = probe
total = Attachment.total_loss
def check(self, *a, **k):
    cap = self.session.capture
    feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in seen]); seen.clear()
    emb, mask = cap.extra["inputs_embeds_unpacked"], cap.extra["image_mask_unpacked"]
    checks.append(dict(packed=bool(cap.extra.get("packed")), rows=cap.inputs_embeds.shape[0],
        n=int(cap.image_mask.sum()), feats=feats.shape[0],
        before=bool(torch.equal(emb[mask].detach(), feats)),
        after=bool(torch.equal(cap.inputs_embeds[cap.image_mask].detach(), feats)),
        text_not_image=bool((cap.text_mask.sum(1) > 0).all()), samples=emb.shape[0]))
    return total(self, *a, **k)
Attachment.total_loss = check
import atexit; atexit.register(lambda: print("MASKCHECK " + json.dumps(checks)))
"""


def test_image_mask_is_where_nvila_placed_the_features_before_and_after_packing(fx, tmp_path):
    """On the real training path: the projector's outputs sit exactly at the recovered image positions of
    `_embed`'s output (the "\\n" NVILA appends after each image is text), and still do in the packed row."""
    p = run(fx, "plugin", nvila_train_args(fx, tmp_path) + ["--regularizer", "rdd"], prelude=MASK_PROBE)
    checks = json.loads(p.stdout.split("MASKCHECK ")[-1].splitlines()[0])
    assert len(checks) == 3
    for c in checks:
        assert c["packed"] and c["rows"] == 1 and c["samples"] == 4  # four samples packed into one row
        assert c["n"] == c["feats"] > 0 and c["before"] and c["after"], c


def _checkout() -> Path:
    import llava
    return Path(list(llava.__path__)[0]).resolve().parent


def vlm_preserve(*args):
    return subprocess.run([sys.executable, "-c", "from vlm_preserve.cli import entry; entry()", *args],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_check_upstream_passes_on_the_pinned_checkout():
    p = vlm_preserve("check-upstream", "nvila", "--source", str(_checkout()))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "declared symbols match" in p.stdout and "forward+backward with rdd,pre ran" in p.stdout


def test_check_upstream_names_drift_in_a_doctored_checkout(tmp_path):
    import shutil
    shutil.copytree(_checkout() / "llava", tmp_path / "llava")
    arch = tmp_path / "llava" / "model" / "llava_arch.py"
    text = arch.read_text()
    assert "    def _embed(\n" in text
    arch.write_text(text.replace("    def _embed(\n", "    def _embed_media(\n"))
    p = vlm_preserve("check-upstream", "nvila", "--source", str(tmp_path), "--skip-run")
    assert p.returncode == 1
    assert "DRIFT llava.model.llava_arch:LlavaMetaForCausalLM._embed: missing (AttributeError" in p.stderr
    assert f"source tree {tmp_path}" in p.stderr and "'upstream_commit': 'b760c34'" in p.stderr
    # the untouched copy passes
    arch.write_text(text)
    assert vlm_preserve("check-upstream", "nvila", "--source", str(tmp_path), "--skip-run").returncode == 0


def test_launch_script_flags_are_all_known():
    import shlex

    import transformers
    from llava.train import train as upstream

    from vlm_preserve.cli.launch import _parser
    from vlm_preserve.frameworks.nvila import SPEC
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(["bash", root / "scripts" / "nvila" / "finetune.sh", "rdd,pre"], capture_output=True, text=True,
                       env=dict(os.environ, DRY_RUN="1", NVILA_TRAIN="nvila-train"))
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout)
    args = words[words.index("nvila-train") + 1:]
    ours, rest = _parser(SPEC).parse_known_args(args)
    assert ours.regularizer == "rdd,pre"
    up = transformers.HfArgumentParser((upstream.ModelArguments, upstream.DataArguments, upstream.TrainingArguments))
    assert up.parse_known_args(rest)[1] == []
    assert Path(rest[rest.index("--deepspeed") + 1]).is_file()
