"""Run a training command until it reaches a moment held by tests/helpers/pause/sitecustomize.py, then SIGKILL it."""
import os
import signal
import subprocess
import threading
from pathlib import Path

PAUSE_DIR = Path(__file__).resolve().parent / "pause"


def pause_env(env: dict, pause: str = "") -> dict:
    """`env` with the pause hook on PYTHONPATH, held at `pause` (none if empty)."""
    env = dict(env, PYTHONPATH=os.pathsep.join([str(PAUSE_DIR), env.get("PYTHONPATH", "")]))
    env.pop("VLM_PRESERVE_TEST_PAUSE", None)
    if pause:
        env["VLM_PRESERVE_TEST_PAUSE"] = pause
    return env


def kill_at(cmd: list, env: dict, pause: str, timeout: float = 300) -> str:
    """Starts `cmd`, waits until it prints that it is held at `pause`, SIGKILLs it there; returns what it printed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=pause_env(env, pause))
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines, paused = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("PAUSED"):
                paused = True
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        timer.cancel()
        proc.stdout.close()
    assert paused and proc.returncode == -signal.SIGKILL, "".join(lines[-60:])
    return "".join(lines)
