"""Bad input fails clearly before any model loads; check-upstream passes on the pin and names drift."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import needs_llava


def llava_train(args, **env):
    code = "from vlm_preserve.cli.llava_train import main; main()"
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore", **env))
    return p, time.time() - t


@pytest.fixture(scope="module")
def base_args(tiny_llava, tmp_path_factory):
    return tiny_llava.train_args(tmp_path_factory.mktemp("never_written"))


@needs_llava
@pytest.mark.parametrize("extra,message", [
    (["--regularizer", "soft_label,dft"], "soft_label and dft each replace the LM loss; enable one of them"),
    (["--regularizer", "rdd,mmd"], "unknown term 'mmd'; choose from: none, rdd, pre, distill, soft_label, dft, attention_tuning"),
    (["--regularizer", "pre", "--pre_layer", "40"], "--pre_layer 40 is out of range for a 4-layer LLM (use 0..3 or 'middle')"),
    (["--regularizer", "rdd", "--rdd_weight", "-1"], "--rdd_weight -1.0 is negative"),
    (["--regularizer", "pre", "--pre_weight", "-0.5"], "--pre_weight -0.5 is negative"),
    (["--regularizer", "rdd", "--pre_weight", "0.5"], "--pre_weight was given but 'pre' is not enabled"),
    (["--rdd_kernel", "linear"], "--rdd_kernel was given but 'rdd' is not enabled"),
    (["--regularizer", "rdd", "--rdd_kernel", "cosine"], "--rdd_kernel 'cosine' is not one of: rbf, linear, poly, l2"),
    (["--regularizer", "attention_tuning", "--lora_enable", "True"], "alternative to --lora_enable"),
])
def test_bad_input_fails_before_any_model_loads(base_args, extra, message):
    p, _ = llava_train(base_args + extra)
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr
    assert "Formatting inputs" not in p.stdout + p.stderr and "instantiate a model" not in p.stderr


def test_missing_upstream_says_how_to_install(tmp_path):
    blocker = tmp_path / "llava"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('No module named llava (simulated)')\n")
    p, _ = llava_train(["--regularizer", "rdd"], PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    assert p.returncode == 2
    assert "upstream LLaVA is not installed" in p.stderr and "pip install --no-deps llava-torch==1.2.2.post1" in p.stderr


def test_help_lists_our_flags():
    p, _ = llava_train(["--help"])
    assert p.returncode == 0
    for flag in ("--regularizer", "--rdd_weight", "--rdd_kernel", "--rdd_max_tokens", "--pre_layer", "--pre_anchor",
                 "--soft_label_alpha", "--language_monitor", "--language_monitor_steps"):
        assert flag in p.stdout


def vlm_preserve(*args, **env):
    code = "from vlm_preserve.cli import entry; entry()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", **env))


@needs_llava
def test_check_upstream_passes_on_the_pinned_version():
    p = vlm_preserve("check-upstream", "llava")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "declared symbols match" in p.stdout and "forward+backward with rdd,pre ran" in p.stdout


def test_check_upstreams_scratch_folder_never_spells_mpt(monkeypatch):
    # LLaVA's train() loads a --model_name_or_path containing "mpt" as MPT: a random temp name once did (CI, stop 34)
    import tempfile

    from vlm_preserve.cli import check_upstream
    names = iter(["mptxxxxx", "abcdefgh"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    with check_upstream._scratch() as d:
        assert Path(d).name == "vlm-preserve-check-abcdefgh"


@needs_llava
def test_a_fixture_root_that_llava_would_read_as_mpt_is_refused(tmp_path):
    from vlm_preserve.testing.fixtures import build_tiny_llava
    with pytest.raises(ValueError, match="contains 'mpt'"):
        build_tiny_llava(tmp_path / "attempt")


@needs_llava
def test_check_upstream_fails_clearly_on_a_doctored_checkout(tmp_path):
    import llava
    src = tmp_path / "checkout"
    shutil.copytree(Path(llava.__file__).parent, src / "llava")
    arch = src / "llava" / "model" / "llava_arch.py"
    text = arch.read_text()
    assert "labels,\n        images, image_sizes=None" in text
    arch.write_text(text.replace("labels,\n        images, image_sizes=None", "labels,\n        pixel_values, image_sizes=None"))
    p = vlm_preserve("check-upstream", "llava", "--source", str(src), "--skip-run")
    assert p.returncode == 1
    assert "DRIFT llava.model.llava_arch:LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal" in p.stderr
    assert "pixel_values" in p.stderr and f"source tree {src}" in p.stderr and "llava-torch 1.2.2.post1" in p.stderr
    # the untouched copy passes
    shutil.rmtree(src)
    shutil.copytree(Path(llava.__file__).parent, src / "llava")
    assert vlm_preserve("check-upstream", "llava", "--source", str(src), "--skip-run").returncode == 0


def test_readme_flag_table_matches_the_config_definitions():
    import dataclasses

    from vlm_preserve.frameworks.llava import LlavaLaunchArguments
    from vlm_preserve.frameworks.nvila import NVILALaunchArguments
    from vlm_preserve.monitor import LanguageMonitorConfig
    from vlm_preserve.regularizers import config_classes
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for cls in config_classes() + (LanguageMonitorConfig,):
        for f in dataclasses.fields(cls):
            shown = f"`{f.default}`" if f.default != "" else "(empty)"
            assert f"| `--{f.name}` | {shown} |" in readme, f.name
    for f in dataclasses.fields(LlavaLaunchArguments) + dataclasses.fields(NVILALaunchArguments):
        assert f"| `--{f.name}` |" in readme


def test_llava_train_refuses_nvilas_llava_package(tmp_path):
    """NVILA (NVlabs/VILA) installs a package also named `llava`: say what was found and what is needed."""
    pkg = tmp_path / "llava" / "train"
    pkg.mkdir(parents=True)
    (tmp_path / "llava" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "args.py").write_text("")
    (pkg / "train.py").write_text("def train():\n    raise SystemExit('must not run')\n")
    p, _ = llava_train(["--regularizer", "rdd"], PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    assert p.returncode == 2
    assert "not upstream LLaVA" in p.stderr and "NVILA" in p.stderr and "llava-torch==1.2.2.post1" in p.stderr


def test_nvila_train_refuses_upstream_llavas_llava_package():
    """The other way round: with upstream LLaVA's `llava` installed, nvila-train names both."""
    pytest.importorskip("llava.train.train", reason="needs an environment with a `llava` package (the llava env)")
    p = subprocess.run([sys.executable, "-c", "from vlm_preserve.cli.nvila_train import main; main()", "--regularizer",
                        "rdd"], capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "is not NVILA" in p.stderr and "upstream LLaVA" in p.stderr and "use llava-train" in p.stderr
    assert "third_party/nvila/README.md" in p.stderr


def test_nvila_train_refuses_distill_before_anything_loads():
    p = subprocess.run([sys.executable, "-c", "from vlm_preserve.cli.nvila_train import main; main()",
                        "--regularizer", "rdd,distill"], capture_output=True, text=True)
    assert p.returncode == 2 and "--regularizer distill is not supported by nvila-train yet" in p.stderr, p.stderr[-800:]
