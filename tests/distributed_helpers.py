"""Launching the multi-process test runs: torchrun (or plain python) subprocesses on CPU with a timeout, so a hang
fails the test instead of blocking CI."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 420  # s; a run takes ~40 s on 2 loaded cores, plus ~80 s once to compile DeepSpeed's CPU ops


def launch_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore",
                TOKENIZERS_PARALLELISM="false",
                # compiled once, not per run (DeepSpeed's shm comm op takes ~80 s of g++); the environments share
                # torch and deepspeed pins, so they share the build
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions")),
                PYTHONPATH=os.pathsep.join([str(ROOT / "plugin"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))


def launch(cmd: list, what: str, timeout: int = LAUNCH_TIMEOUT) -> None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        raise AssertionError(f"{what} did not finish in {timeout} s (a hang: ranks ran different collectives?)\n"
                             f"{tail.decode() if isinstance(tail, bytes) else tail}") from None
    assert p.returncode == 0, f"{what} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}"
