"""SIGKILL during training, through the Python API on a transformers.Trainer (RDD + PRe, whose head has optimizer
state; distill): each run is a child process held at one moment (tests/helpers/pause/sitecustomize.py) and really
killed with SIGKILL there — between checkpoints, or while a checkpoint is written (upstream's part of the save, or
the plugin's heads after it). Resuming with resume_from_checkpoint=True must skip a cut checkpoint with a line naming
it, never rotate the last complete one away before the new one is whole, and then log the same loss and per-term
sequence, and end with the same weights and heads, as an uninterrupted run (CPU, float tolerance).
upstream LLaVA's llava-train: tests/test_llava_train.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "SmolVLMForConditionalGeneration"):
    pytest.skip("needs transformers >= 4.50 (the transformers-native environment)", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from helpers import kill  # noqa: E402
from vlm_preserve.checkpoints import COMPLETE_FILE, cut_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "kill_worker.py"
TIMEOUT = 300


def _env() -> dict:
    return kill.pause_env(dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
                               PYTHONPATH=os.pathsep.join([str(ROOT / "plugin"), str(ROOT / "tests"),
                                                           os.environ.get("PYTHONPATH", "")])))


def train(out: Path, regs: str, *flags: str) -> str:
    p = subprocess.run([sys.executable, str(WORKER), "--out", str(out), "--regs", regs, *flags],
                       capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert p.returncode == 0 and "TRAINED" in p.stdout, (p.stdout + p.stderr)[-6000:]
    return p.stdout + p.stderr


def kill_at(out: Path, regs: str, pause: str, *flags: str) -> None:
    kill.kill_at([sys.executable, str(WORKER), "--out", str(out), "--regs", regs, *flags], _env(), pause, TIMEOUT)


def history(out: Path) -> list:
    """The logged rows (step, every *loss key) of the final checkpoint's trainer state."""
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    return [{k: v for k, v in r.items() if k == "step" or k.endswith("loss")} for r in state["log_history"]
            if "loss" in r]


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = history(out), history(ref)
    assert [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
    assert [sorted(r) for r in got] == [sorted(r) for r in want], (got, want)
    assert any(k not in ("loss", "lm_loss", "step") for r in want for k in r)  # the terms were logged
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-7), (g, w)
    for name in ("model.safetensors", "vlm_preserve_heads.safetensors"):
        if (ref / "checkpoint-6" / name).exists():
            a, b = load_file(out / "checkpoint-6" / name), load_file(ref / "checkpoint-6" / name)
            assert a.keys() == b.keys()
            for k in b:
                assert (a[k] - b[k]).abs().max() <= 1e-5 * (1 + b[k].abs().max()), (name, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = {}

    def get(regs: str) -> Path:
        if regs not in runs:
            out = tmp_path_factory.mktemp("reference") / regs.replace(",", "+")
            train(out, regs)
            assert all((out / f"checkpoint-{s}" / COMPLETE_FILE).exists() for s in (2, 4, 6))
            runs[regs] = out
        return runs[regs]
    return get


# (regularizers, the moment of the kill, save_total_limit): "heads" with a limit of 1 is where upstream's own
# rotation (inside its save, before the plugin's heads) would already have deleted the only complete checkpoint
CASES = [("rdd,pre", "log:3", None), ("rdd,pre", "heads:4", 1), ("rdd,pre", "rng:2", None),
         ("distill", "log:3", None), ("distill", "rng:4", None)]


@pytest.mark.parametrize("regs,pause,keep", CASES, ids=[f"{r}-{p}" for r, p, _ in CASES])
def test_killed_training_resumes_as_if_uninterrupted(regs, pause, keep, tmp_path, reference):
    out, flags = tmp_path / "run", (["--keep", str(keep)] if keep else [])
    kill_at(out, regs, pause, *flags)
    moment, step = pause.split(":")[0], int(pause.split(":")[1])
    cut = None if moment == "log" else out / f"checkpoint-{step}"
    if cut is None:
        assert (out / "checkpoint-2" / COMPLETE_FILE).exists() and not (out / "checkpoint-4").exists()
    else:
        assert cut.is_dir() and not (cut / COMPLETE_FILE).exists(), sorted(os.listdir(cut))
        if step > 2:  # the complete one before it is still there, whatever save_total_limit says
            assert (out / "checkpoint-2" / COMPLETE_FILE).exists()
    log = train(out, regs, "--resume", *flags)
    if cut is not None:
        assert cut_line(str(cut)) in log, log[-3000:]
    if step > 2 or cut is None:
        assert f"resuming from {out / 'checkpoint-2'}" in log, log[-3000:]
    else:
        assert "no complete checkpoint" in log and "training starts at step 0" in log, log[-3000:]
    assert_same_run(out, reference(regs))
    if keep:
        assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-6"]
