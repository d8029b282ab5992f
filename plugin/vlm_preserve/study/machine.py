"""What machine a timing was taken on: its idle cores and its fp32 GEMM rate (machines here differ several-fold)."""
from __future__ import annotations

import os
import time

import torch


def idle_cores(window: float = 0.5) -> int:
    """Cores idle now: from two /proc/stat samples `window` s apart where there is one, else from the load average
    (which lags by about a minute: just after the demo's pip install it still counts a busy core on an idle machine,
    and the demo then ran on half the CPU)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    n = os.cpu_count() or 1
    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
        return round(n * (i1 - i0) / max(1, t1 - t0))
    except (OSError, ValueError, IndexError):
        return n - int(os.getloadavg()[0] + 0.5)


_GFLOPS: list = []


def cpu_gflops() -> float:
    """fp32 GEMM rate (1024³, this process's torch threads), measured once per process: machines here differ
    several-fold, so every recorded timing carries the speed of the machine it ran on."""
    if not _GFLOPS:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        a @ b
        best, start = 0.0, time.perf_counter()
        # The best of ~1 s of rounds: a single short round read half the idle rate right after a pip install.
        while time.perf_counter() - start < 1.0:
            t0 = time.perf_counter()
            for _ in range(5):
                a @ b
            best = max(best, 5 * 2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9)
        _GFLOPS.append(round(best, 1))
    return _GFLOPS[0]
