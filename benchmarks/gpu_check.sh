#!/usr/bin/env bash
# The GPU record: one run on one H100/H200 (2 GPUs are used for ZeRO-3 where there are 2), under ten minutes, with
# only what is installed there (nothing is downloaded or built).
#
#   bash benchmarks/gpu_check.sh [OUT_JSON]      PYTHON=... picks the interpreter (default: python)
#
# Default OUT_JSON: benchmarks/results/<date>-gpu-check.json. Steps, each under its own time limit, each recorded in
# the JSON (ok, exit status, seconds, command, output tail) whether it passes or not:
#   0  versions of torch, flash-attn, bitsandbytes, deepspeed, transformers, peft, llava; one line per absent one,
#      saying which step it skips
#   1  llava-train on the tiny fixture, bf16, --attn_implementation flash_attention_2: rdd, pre, distill (4 steps each;
#      ok = every step logged a finite loss and the term's own loss)
#   2  QLoRA: the same with --bits 4 --lora_enable True (bitsandbytes, peft), rdd,pre
#   3  transformers-native Llava under DeepSpeed ZeRO-3 over NCCL (tests/helpers/distributed_worker.py --cuda),
#      rdd,pre,distill with a checkpoint and a resume, against the single-process run on the same global batches
#   4  overhead of rdd / pre / distill at a ~1B shape: benchmarks/bench_overhead.py --gpu-1b (ratios to `none`)
# Then a table. Exit status: 0 when every step that ran passed (or there is no CUDA device), else 1.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False, or torch cannot be imported): nothing to measure, exiting 0."
  exit 0
fi
OUT=${1:-benchmarks/results/$(date +%F)-gpu-check.json}
exec "$PY" - "$OUT" <<'PYTHON'
import importlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT, OUT, T0, BUDGET = Path.cwd(), Path(sys.argv[1]), time.time(), 570  # s: leaves margin under ten minutes
ENV = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=os.pathsep.join([str(ROOT / "plugin"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests")]
import torch  # noqa: E402

rec = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
       "cuda": torch.version.cuda, "versions": {}, "skipped": {}, "steps": {}}


def version(module: str, dist: str):
    try:
        m = importlib.import_module(module)
    except Exception as e:  # absent, or present but broken: either way not usable here
        return None, f"{type(e).__name__}: {e}"[:200]
    try:
        return getattr(m, "__version__", None) or importlib.metadata.version(dist), None
    except importlib.metadata.PackageNotFoundError:
        return "unknown", None


SKIPS = {"torch": "every step", "transformers": "every step", "flash_attn": "step 1 (llava-train with flash_attention_2); step 4 runs with sdpa",
         "bitsandbytes": "step 2 (QLoRA --bits 4)", "peft": "step 2 (QLoRA needs LoRA)",
         "deepspeed": "step 3 (ZeRO-3 over NCCL)", "llava": "steps 1 and 2 (upstream LLaVA's train())"}
for module, dist in (("torch", "torch"), ("flash_attn", "flash-attn"), ("bitsandbytes", "bitsandbytes"),
                     ("deepspeed", "deepspeed"), ("transformers", "transformers"), ("peft", "peft"),
                     ("llava", "llava-torch")):
    v, err = version(module, dist)
    rec["versions"][dist] = v
    if v is None:
        rec["skipped"][dist] = {"error": err, "skips": SKIPS[module]}
        print(f"absent {dist} ({err}): skipping {SKIPS[module]}", flush=True)
    else:
        print(f"found {dist} {v}", flush=True)
have = {k: v is not None for k, v in rec["versions"].items()}


def step(name: str, cmd: list, limit: int, check=None) -> bool:
    left = BUDGET - (time.time() - T0)
    if left < 30:
        rec["steps"][name] = {"ok": False, "rc": None, "note": "not run: the ten-minute budget is spent"}
        print(f"  {name}: not run (budget spent)", flush=True)
        return False
    t = time.time()
    try:
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV, timeout=min(limit, left))
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-3000:]
    note = ""
    ok = rc == 0
    if ok and check is not None:
        try:
            note = check() or ""
        except Exception as e:  # a failed check is a result, not a crash of the record
            ok, note = False, f"check failed: {type(e).__name__}: {e}"[:500]
    rec["steps"][name] = {"ok": ok, "rc": rc, "s": round(time.time() - t, 1), "note": note,
                          "cmd": [str(c) for c in cmd], "tail": tail}
    print(f"  {name}: {'ok' if ok else 'FAILED'} ({rec['steps'][name]['s']} s) {note}", flush=True)
    return ok


def logged(out: Path, term: str) -> str:
    rows = [r for r in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows), rows
    terms = [r[term] for r in rows if term in r]
    assert terms and all(math.isfinite(v) for v in terms), (term, rows)
    return f"{term} {terms[-1]:.4g}"


SEEDED = ("import sys, torch; torch.manual_seed(0); sys.argv = ['train'] + sys.argv[1:]; "
          "from vlm_preserve.cli.llava_train import main; main(sys.argv[1:])")
tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
if have["llava-torch"]:
    from vlm_preserve.testing.fixtures import build_tiny_llava
    fx = build_tiny_llava(tmp / "fixture")
    if have["flash-attn"]:
        for reg in ("rdd", "pre", "distill"):
            out = tmp / f"fa2-{reg}"
            step(f"llava-train fa2 bf16 {reg}", [sys.executable, "-c", SEEDED, *fx.train_args(out, bf16="True"),
                                                 "--attn_implementation", "flash_attention_2", "--regularizer", reg],
                 120, lambda out=out, reg=reg: logged(out, f"{reg}_loss"))
    if have["bitsandbytes"] and have["peft"]:
        out = tmp / "qlora"
        attn = ["--attn_implementation", "flash_attention_2"] if have["flash-attn"] else []
        step("llava-train QLoRA --bits 4 rdd,pre",
             [sys.executable, "-c", SEEDED, *fx.train_args(out, bf16="True", bits=4, lora_enable="True", lora_r=8,
                                                           lora_alpha=16), *attn, "--regularizer", "rdd,pre"],
             150, lambda: logged(out, "rdd_loss") + "; " + logged(out, "pre_loss"))

if have["deepspeed"]:
    from helpers.distributed_runs import write_data
    d = tmp / "zero3"
    d.mkdir()
    data = write_data(d)
    worker = [sys.executable, ROOT / "tests" / "helpers" / "distributed_worker.py", "--data", data, "--cuda",
              "--regs", "rdd+pre+distill"]
    ranks = min(2, torch.cuda.device_count())

    def same_rows() -> str:
        got, want = (json.loads((d / n / "rdd+pre+distill" / "result.json").read_text())["rows"] for n in ("z3", "ref"))
        assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2], (got, want)
        worst = max(abs(g[k] - w[k]) / max(abs(w[k]), 1e-6) for g, w in zip(got, want) for k in w if k.endswith("loss"))
        rec["zero3_max_rel_diff_vs_single_process"] = worst
        assert worst <= 1e-3, f"ZeRO-3 differs from the single-process run by {worst:.2e} (relative)"
        return f"{ranks} rank(s); logged terms within {worst:.1e} (relative) of the single-process run"

    if step("zero3 reference (1 process)", [*worker, "--out", d / "ref"], 150):
        step("zero3 nccl rdd,pre,distill", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", ranks,
                                            *worker, "--out", d / "z3", "--stage", 3], 200, same_rows)

part_c = tmp / "part_c.json"
if step("overhead ~1B (bench_overhead.py --gpu-1b)",
        [sys.executable, ROOT / "benchmarks" / "bench_overhead.py", "--gpu-1b", "--json", part_c], 260):
    rec["overhead_1b"] = json.loads(part_c.read_text())["part_c"]

rec["wall_s"] = round(time.time() - T0, 1)
OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps(rec, indent=1, default=str))
print(f"\nGPU check on {rec['gpu']} x{rec['gpus']}, CUDA {rec['cuda']}, torch {rec['versions']['torch']}; "
      f"{rec['wall_s']:.0f} s; JSON: {OUT}")
print(f"{'step':46s} {'result':7s} {'s':>6s}  note")
for name, s in rec["steps"].items():
    print(f"{name:46s} {'ok' if s['ok'] else 'FAILED':7s} {s.get('s', float('nan')):6.1f}  {s.get('note', '')}")
for dist, why in rec["skipped"].items():
    print(f"{dist + ' absent':46s} {'skipped':7s} {'':>6s}  {why['skips']}")
if "overhead_1b" in rec:
    c = rec["overhead_1b"]
    print(f"\noverhead at ~1B ({c['configs']['none']['params'] / 1e9:.2f} B params, {c['attn']}, bf16):")
    print(f"{'config':8s} {'ms/step':>8s} {'x none':>7s} {'peak GiB':>9s} {'x none':>7s}")
    for name, r in c["configs"].items():
        print(f"{name:8s} {r['median_step_s'] * 1e3:8.1f} {r['time_ratio']:7.3f} {r['peak_cuda_bytes'] / 2 ** 30:9.2f} "
              f"{r['mem_ratio']:7.3f}")
sys.exit(0 if all(s["ok"] for s in rec["steps"].values()) else 1)
PYTHON
