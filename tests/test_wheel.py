"""What `pip install vlm-preserve-plugin` gives a user: the built wheel in a fresh venv, console scripts run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]



def sh(*cmd, cwd=None, check=True, env=None):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.mark.skipif(os.environ.get("VLM_PRESERVE_TEST_ENV", "llava") != "llava",
                    reason="environment-independent: runs once, in the llava environment")
def test_wheel_installs_in_a_fresh_venv_and_its_console_scripts_run(tmp_path):
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT)
    wheel = next((tmp_path / "dist").glob("vlm_preserve_plugin-*.whl"))
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    sh(*pip, "torch==2.13.0")  # pinned first: the wheel's torch>=2.0 is then already satisfied
    sh(*pip, wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    help_ = sh(venv / "bin" / "vlm-preserve", "--help", cwd=tmp_path, env=env)
    assert "check-upstream" in help_.stdout and "demo" in help_.stdout and "diagnose" in help_.stdout
    # diagnose without its optional extra: says what to install before loading anything
    p = sh(venv / "bin" / "vlm-preserve", "diagnose", "--model", "m", "--data", "d.json", "--out", "o", cwd=tmp_path,
           env=env, check=False)
    assert p.returncode == 2 and "pip install 'vlm-preserve-plugin[diagnose]'" in p.stderr
    train_help = sh(venv / "bin" / "llava-train", "--help", cwd=tmp_path, env=env)
    assert "--regularizer" in train_help.stdout and "--rdd_weight" in train_help.stdout
    # no upstream LLaVA in this venv: a clear error that says how to install it
    p = sh(venv / "bin" / "llava-train", "--regularizer", "rdd", cwd=tmp_path, env=env, check=False)
    assert p.returncode == 2 and "pip install --no-deps llava-torch==1.2.2.post1" in p.stderr
    # the upstream declarations ship inside the wheel
    code = ("from vlm_preserve.cli.check_upstream import declarations; "
            "print(*(len(declarations(u)['symbols']) for u in ('llava', 'bunny', 'nvila')))")
    shipped = sh(venv / "bin" / "python", "-c", code, cwd=tmp_path, env=env).stdout.split()
    expected = [str(len(json.loads((ROOT / "upstream_symbols" / u / "symbols.json").read_text())["symbols"]))
                for u in ("llava", "bunny", "nvila")]
    assert shipped == expected
    # every subpackage ships (the offline tools, the fixtures check-upstream runs on)
    code = "import vlm_preserve.offline.merge, vlm_preserve.offline.eval_language, vlm_preserve.testing.fixtures"
    sh(venv / "bin" / "python", "-c", code, cwd=tmp_path, env=env)
    # so does the language monitor's builtin text set
    code = "from vlm_preserve.monitor import load_texts; print(len(load_texts('builtin')))"
    assert sh(venv / "bin" / "python", "-c", code, cwd=tmp_path, env=env).stdout.split() == ["40"]
