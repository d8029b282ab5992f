"""Our LLaVA launch scripts pass only flags that upstream's dataclasses or ours define."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_llava

ROOT = Path(__file__).resolve().parents[1]


@needs_llava
@pytest.mark.parametrize("script,reg", [("finetune.sh", "rdd,pre"), ("finetune.sh", "attention_tuning"),
                                        ("finetune_lora.sh", "pre"), ("pretrain.sh", "rdd"),
                                        ("finetune.sh", "soft_label")])
def test_launch_script_flags_are_all_known(script, reg):
    import transformers
    from llava.train import train as upstream

    from vlm_preserve.cli.llava_train import _parser
    p = subprocess.run(["bash", ROOT / "scripts" / "llava" / script, reg], capture_output=True, text=True,
                       env=dict(os.environ, DRY_RUN="1", LLAVA_TRAIN="llava-train"))
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout.replace("\\\n", " "))
    args = words[words.index("llava-train") + 1:]
    ours, rest = _parser().parse_known_args(args)
    assert ours.regularizer == reg
    up = transformers.HfArgumentParser((upstream.ModelArguments, upstream.DataArguments, upstream.TrainingArguments))
    _, unknown = up.parse_known_args(rest)
    assert unknown == []
    assert "--deepspeed" in rest and Path(rest[rest.index("--deepspeed") + 1]).exists()


def test_test_command_refuses_a_source_variable_that_is_not_a_checkout(tmp_path):
    p = subprocess.run(["bash", ROOT / "scripts" / "test.sh"], capture_output=True, text=True,
                       env=dict(os.environ, VLM_PRESERVE_BUNNY_SRC=str(tmp_path)))
    assert p.returncode == 2 and f"VLM_PRESERVE_BUNNY_SRC={tmp_path} has no bunny/train/train.py" in p.stderr
    assert "[test] environment" not in p.stdout  # nothing was built or run


def test_a_skip_in_an_upstream_test_file_fails_its_environment(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    (tmp_path / "tests" / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "tests" / "test_bunny.py").write_text(
        "import pytest\n\ndef test_runs():\n    pass\n\ndef test_skipped():\n    pytest.skip('no GPU')\n")

    def pytest_in(env):
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_bunny.py"],
                              cwd=tmp_path, capture_output=True, text=True,
                              env=dict(os.environ, VLM_PRESERVE_TEST_ENV=env))
    strict, elsewhere = pytest_in("bunny"), pytest_in("llava")
    assert strict.returncode == 1, strict.stdout[-2000:]
    assert "1 skip(s) in tests/test_bunny.py" in strict.stdout and "test_skipped" in strict.stdout
    assert elsewhere.returncode == 0, elsewhere.stdout[-2000:]


def test_fetch_upstreams_names_a_missing_pin(tmp_path):
    mirror = tmp_path / "mirror"
    for cmd in (["init", "-q", str(mirror)], ["-C", str(mirror), "-c", "user.name=t", "-c", "user.email=t@t",
                                              "commit", "-q", "--allow-empty", "-m", "not the pin"]):
        subprocess.run(["git", *cmd], check=True)
    p = subprocess.run(["bash", ROOT / "scripts" / "fetch_upstreams.sh", tmp_path / "out"], capture_output=True,
                       text=True, env=dict(os.environ, VLM_PRESERVE_BUNNY_URL=str(mirror)))
    assert p.returncode == 1 and "commit 08273acbd83b6836c03dce25cc134eb6b9cedba5 not found" in p.stderr
    assert "export" not in p.stdout


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    """benchmarks/gpu_check.sh on a machine without CUDA (CUDA_VISIBLE_DEVICES hides any GPU): one clear line, exit
    0, nothing written; the check runs before anything is built or measured, so this takes one torch import."""
    out = tmp_path / "gpu.json"
    p = subprocess.run(["bash", ROOT / "benchmarks" / "gpu_check.sh", out], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 1 and p.stdout.startswith("gpu_check: no CUDA device here"), p.stdout
    assert not out.exists()
