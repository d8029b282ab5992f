"""Launching the multi-process test runs: torchrun (or plain python) subprocesses on CPU with a timeout, so a hang
fails the test instead of blocking CI; the data they share and how their results are compared (test_distributed.py:
DeepSpeed, test_fsdp.py: accelerate FSDP; tests/helpers/distributed_worker.py does the runs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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


def leave_worker() -> None:
    """The end of a worker's successful run: wait for every rank, then leave without interpreter teardown.
    DeepSpeed-on-gloo ranks aborted at exit after writing their results ("terminate called without an active
    exception", SIGABRT), once in the native worker and once in the LLaVA worker even after destroy_process_group:
    a C++ thread torn down during static destruction. The tests judge what the runs computed, so the process skips
    that teardown; a failing run never gets here and exits with its traceback."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write_data(d: Path) -> Path:
    """A tiny Llava checkpoint, a teacher that disagrees with it (so distill is not 0) and the four batches every
    run trains on (1: rank 0's mixed batch, 2: rank 1's one image, then two mixed ones); returns the data file."""
    import torch

    from helpers.native_models import build, make_batch, teacher_of
    model = build("llava")
    model.save_pretrained(d / "model")
    teacher_of(model, noise=0.05).save_pretrained(d / "teacher")
    batches = [make_batch(model, "llava", seed=0), make_batch(model, "llava", batch=1, seed=1),
               make_batch(model, "llava", seed=2), make_batch(model, "llava", seed=3)]
    torch.save({"model": str(d / "model"), "teacher": str(d / "teacher"), "batches": batches}, d / "data.pt")
    return d / "data.pt"


def run_worker(d: Path, engines: dict, regs: str | None = None) -> Path:
    """The single-process reference into d/ref, then each engine (name -> worker flags) on 2 processes into
    d/<name>, all on the data written to d; returns d."""
    worker = [str(ROOT / "tests" / "helpers" / "distributed_worker.py"), "--data", str(write_data(d))]
    worker += ["--regs", regs] if regs else []
    launch([sys.executable, *worker, "--out", str(d / "ref")], "single-process reference")
    for name, flags in engines.items():
        launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *worker,
                "--out", str(d / name), *flags], f"{name} on 2 processes")
    return d


def result(runs: Path, name: str, reg: str) -> dict:
    return json.loads((runs / name / reg / "result.json").read_text())


def assert_rows_equal(got: list, want: list, what: str, rel: float) -> None:
    """Both runs logged the same values (every `*loss` key) at steps 1 and 2, within `rel` (or 1e-6 absolute)."""
    import pytest
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2], what
    for g, w in zip(got, want):
        keys = {k for k in w if k.endswith("loss")}
        assert {k for k in g if k.endswith("loss")} == keys, (what, g, w)
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=rel, abs=1e-6), (what, k, g, w)
