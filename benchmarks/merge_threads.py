"""Where a merge's CPU goes, thread by thread: cold merges of a checkpoint pair in this process, each thread's user
and system CPU sampled from /proc/self/task every 0.2 s; `intra-op` = torch's own worker threads (not Python
threads). With --compare-threads, three variants are measured side by side, each first in turn: the merge as it is;
its arithmetic left on torch's default thread count (without `_one_thread`); and that with the previous step size
(`CHUNK` 1 << 16), which is the merge before both changes (63ed847).

    PYTHONPATH=plugin .venv/transformers/bin/python benchmarks/bench_merge.py --size 7b --generate /tmp/pair7b
    PYTHONPATH=plugin .venv/transformers/bin/python benchmarks/merge_threads.py /tmp/pair7b --compare-threads \
        --reps 3 --json benchmarks/results/DATE-merge-7b-threads.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import evict, gflops  # noqa: E402


def profiled_merge(pair: Path, out: Path) -> dict:
    from vlm_preserve.offline.merge import merge
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    evict(pair / "vlm", pair / "llm")
    tick, seen, stop = os.sysconf("SC_CLK_TCK"), {}, threading.Event()

    def sample():
        while not stop.is_set():
            names = {str(t.native_id): t.name for t in threading.enumerate()}
            for tid in os.listdir("/proc/self/task"):
                try:
                    user, system = cpu(tid)
                except OSError:
                    continue
                name = names.get(tid, seen.get(tid, ("intra-op",))[0]).rsplit("_", 1)[0]
                u0, s0 = start.get(tid, (0, 0))
                seen[tid] = (name, user - u0, system - s0)
            stop.wait(0.2)

    def cpu(tid):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / tick, int(fields[12]) / tick

    start = {tid: cpu(tid) for tid in os.listdir("/proc/self/task")}  # threads that outlive a merge: counted from here
    th = threading.Thread(target=sample, name="sampler", daemon=True)
    th.start()
    t = time.perf_counter()
    merge(str(pair / "vlm"), str(pair / "llm"), [0.3], str(out), show_progress=False)
    os.sync()
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    shutil.rmtree(out)
    threads: dict[str, list[float]] = {}
    for name, user, system in seen.values():
        if name != "sampler":
            acc = threads.setdefault(name, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + user, acc[1] + system
    return {"wall_s": round(wall, 2), "cpu_s": round(sum(u + s for u, s in threads.values()), 1),
            "threads_user_sys_s": {k: [round(u, 1), round(s, 1)] for k, (u, s) in sorted(threads.items())}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pair", type=Path, help="a folder with llm/ and vlm/ (bench_merge.py --generate makes one)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/merge_threads_out"))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--compare-threads", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch
    import vlm_preserve.offline.merge as m
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "gemm_fp32_gflops": round(gflops(), 1),
           "input_bytes": sum(f.stat().st_size for f in args.pair.rglob("*.safetensors"))}
    print(json.dumps(res), flush=True)
    one_thread, chunk = m._one_thread, m.CHUNK
    variants = [("as_is", one_thread, chunk)] + ([
        ("torch_threads_default", contextlib.nullcontext, chunk),
        ("before", contextlib.nullcontext, 1 << 16)] if args.compare_threads else [])  # 63ed847's merge
    for rep in range(args.reps):
        k = rep % len(variants)
        for name, ctx, m.CHUNK in variants[k:] + variants[:k]:  # each variant first in turn
            m._one_thread = ctx
            r = profiled_merge(args.pair, args.out)
            res.setdefault(name, []).append(r)
            print(name, rep, json.dumps(r), flush=True)
    m._one_thread, m.CHUNK = one_thread, chunk
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
