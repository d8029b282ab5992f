"""Overhead of the RDD and PRe terms: step time and peak memory.

    PYTHONPATH=plugin python benchmarks/bench_overhead.py [--quick] [--json PATH]

Part A, CPU reference shape, end to end: upstream LLaVA train() on the tiny fixture (wider and deeper than
the test one), plain upstream and `llava-train --regularizer none|rdd|pre|rdd,pre`, each run in a fresh
subprocess, configs interleaved over repeats. Step time = wall time from on_step_begin to on_step_end
(forward, backward, optimizer; no data loading or logging), median over the steps after warm-up, then
median over repeats. Peak memory = the subprocess's peak RSS (ru_maxrss), whole process.

Part B, LLaVA-1.5-7B shape, the terms alone (fp32, CPU, fresh subprocess each): RDD (`mmd2`, default rbf
kernel, default block, `subsample` to the default cap per modality) and PRe (`PReHead(d, d)` + `pre_loss`)
forward+backward on random tensors. Extra memory = peak RSS during the first forward+backward minus RSS
just before it (inputs, and the PRe head's weights, already allocated). Compared with an *estimated* 7B
step: FLOPs = 6·P·tokens + attention, time = FLOPs / this CPU's fp32 GEMM rate measured in the same run;
per-GPU memory = ZeRO-3 model states over 8 GPUs + checkpointed layer inputs (formulas printed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = ["upstream", "none", "rdd", "pre", "rdd,pre"]
P_7B, LAYERS_7B, GPUS, TARGET = 6.7e9, 32, 8, 0.01


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_worker(*args) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- workers (run in a fresh interpreter)
def worker_train(config: str, fixture: str, out: str, steps: int, batch: int) -> dict:
    import torch
    import transformers.trainer as hf_trainer
    from transformers import TrainerCallback
    from transformers.models.llama import modeling_llama

    from vlm_preserve.fixtures import TinyLlavaFixture
    from pathlib import Path

    class Timer(TrainerCallback):
        times, tokens, padded = [], [], []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    hf_trainer.DEFAULT_CALLBACKS.append(timer)  # the list Trainer.__init__ reads
    original = modeling_llama.LlamaModel.forward

    def forward(self, *a, **k):  # records the shape the decoder sees (text + inserted visual tokens)
        if self.training and k.get("inputs_embeds") is not None:
            timer.padded.append(list(k["inputs_embeds"].shape))
            timer.tokens.append(int(k["attention_mask"].sum()))
        return original(self, *a, **k)
    modeling_llama.LlamaModel.forward = forward

    root = Path(fixture)
    fx = TinyLlavaFixture(root, root / "llm", root / "vision", root / "data.json", root / "images")
    argv = fx.train_args(out, max_steps=steps, per_device_train_batch_size=batch)
    torch.manual_seed(0)  # upstream initialises the projector before the Trainer seeds
    sys.argv = ["train"] + argv
    if config == "upstream":
        from llava.train.train import train
        train()
    else:
        from vlm_preserve.cli.llava_train import main
        main(argv + ["--regularizer", config])
    return {"step_s": timer.times, "peak_rss": peak_rss(), "padded_shape": timer.padded, "tokens": timer.tokens}


def worker_term(term: str, batch: int, n_text: int, n_vis: int, d: int, cap: int, reps: int) -> dict:
    import torch
    from vlm_preserve.regularizers.pre import PReHead, pre_loss
    from vlm_preserve.regularizers.rdd import RDDConfig, mmd2, subsample

    torch.manual_seed(0)
    if term == "gemm":
        a, b = torch.randn(d, d), torch.randn(d, d)
        a @ b
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
        return {"gemm_s": ts, "flops_per_s": 2 * d ** 3 / statistics.median(ts)}
    if term == "rdd":
        rc = RDDConfig()
        x = torch.randn(batch * n_text, d, requires_grad=True)
        y = torch.randn(batch * n_vis, d, requires_grad=True)

        def fwd(seed):
            g = torch.Generator().manual_seed(seed)
            return mmd2(subsample(x, cap, g), subsample(y, cap, g), rc.rdd_kernel, rc.rdd_bandwidth_scale,
                        rc.rdd_block_size)
        inputs = [x, y]
    else:
        head = PReHead(d, d)
        h = torch.randn(batch * n_vis, d, requires_grad=True)
        anchor = torch.randn(batch * n_vis, d)

        def fwd(seed):
            return pre_loss(head(h), anchor)
        inputs = [h, *head.parameters()]
    base = rss_now()
    fwd(0).backward()  # first (cold) pass: memory
    extra = peak_rss() - base
    tf, tb = [], []
    for r in range(reps):
        for p in inputs:
            p.grad = None
        t0 = time.perf_counter()
        loss = fwd(r + 1)
        t1 = time.perf_counter()
        loss.backward()
        tf.append(t1 - t0)
        tb.append(time.perf_counter() - t1)
    return {"fwd_s": tf, "bwd_s": tb, "extra_peak_bytes": extra}


# ---------------------------------------------------------------- analytic FLOPs
def rdd_flops(n_t: int, n_v: int, d: int) -> float:
    """Kernel matmuls: forward 2·d·(n_t² + n_v² + n_t·n_v); backward recomputes the forward (checkpointing)
    and needs both operand gradients (2× forward): 4× forward in all. Elementwise terms ignored."""
    return 4 * 2 * d * (n_t ** 2 + n_v ** 2 + n_t * n_v)


def pre_flops(n: int, d: int, d_out: int) -> float:
    """Two Linear layers, forward 2·n·(d·d + d·d_out); backward grads of weights and of the input: 3× forward."""
    return 3 * 2 * n * (d * d + d * d_out)


def step_flops(batch: int, seq: int, d: int) -> dict:
    dense = 6 * P_7B * batch * seq
    attn = 3 * 4 * batch * seq ** 2 * d * LAYERS_7B  # QKᵀ and AV, full (not causal-halved), fwd + 2× bwd
    return {"dense": dense, "attention": attn, "total": dense + attn}


def step_memory(batch: int, seq: int, d: int) -> dict:
    states = 16 * P_7B / GPUS                        # bf16 weights+grads, fp32 master+Adam m,v; ZeRO-3 / 8
    acts = LAYERS_7B * batch * seq * d * 2           # bf16 layer inputs kept by gradient checkpointing
    return {"model_states": states, "checkpointed_activations": acts, "total": states + acts}


# ---------------------------------------------------------------- driver
def part_a(args, tmp: str) -> dict:
    from vlm_preserve.fixtures import build_tiny_llava
    fx = build_tiny_llava(os.path.join(tmp, "fx"), hidden_size=args.a_hidden, layers=args.a_layers,
                          n_image_samples=48, n_text_samples=16)
    runs = {c: [] for c in CONFIGS}
    for rep in range(args.repeats):
        for c in (CONFIGS if rep % 2 == 0 else CONFIGS[::-1]):  # interleaved, alternating order
            r = run_worker("--_train", c, fx.root, os.path.join(tmp, f"run{rep}_{c}"), args.a_steps, args.a_batch)
            runs[c].append(r)
            print(f"  A rep {rep} {c:8s} {statistics.median(r['step_s'][args.a_warmup:]) * 1e3:8.1f} ms/step",
                  flush=True)
    res = {}
    for c in CONFIGS:
        res[c] = {"step_s": statistics.median(statistics.median(r["step_s"][args.a_warmup:]) for r in runs[c]),
                  "peak_rss": statistics.median(r["peak_rss"] for r in runs[c]),
                  "runs": [{"step_s": r["step_s"], "peak_rss": r["peak_rss"]} for r in runs[c]]}
    r0 = runs["none"][0]
    shape = {"batch": args.a_batch, "hidden": args.a_hidden, "layers": args.a_layers,
             "padded_shapes": r0["padded_shape"], "mean_attended_tokens": statistics.mean(r0["tokens"]),
             "visual_tokens_per_image": 16, "steps": args.a_steps, "warmup_steps_dropped": args.a_warmup,
             "repeats": args.repeats}
    print(f"\nPart A: CPU reference shape, upstream LLaVA train(), batch {args.a_batch}, width {args.a_hidden}, "
          f"{args.a_layers} layers, mean {shape['mean_attended_tokens']:.0f} attended tokens/batch "
          f"(padded {r0['padded_shape'][0][1]}..{max(s[1] for s in r0['padded_shape'])}/sample, 16 visual/image)")
    print(f"{'config':10s} {'ms/step':>9s} {'x none':>7s} {'peak RSS MiB':>13s} {'x none':>7s}")
    for c in CONFIGS:
        print(f"{c:10s} {res[c]['step_s'] * 1e3:9.1f} {res[c]['step_s'] / res['none']['step_s']:7.3f} "
              f"{res[c]['peak_rss'] / 2**20:13.0f} {res[c]['peak_rss'] / res['none']['peak_rss']:7.3f}")
    return {"shape": shape, "configs": res}


def part_b(args) -> dict:
    B, nt, nv, d, cap = args.b_batch, 600, 576, 4096, args.rdd_cap
    gemm = run_worker("--_term", "gemm", B, nt, nv, d, cap, 5)
    rate = gemm["flops_per_s"]
    sf, sm = step_flops(B, nt + nv, d), step_memory(B, nt + nv, d)
    step_s = sf["total"] / rate
    n_t, n_v = (min(B * nt, cap), min(B * nv, cap)) if cap > 0 else (B * nt, B * nv)
    terms = {"rdd": rdd_flops(n_t, n_v, d), "pre": pre_flops(B * nv, d, d)}
    pre_states = 16 * (2 * d * d + 2 * d) / GPUS  # the head's own ZeRO-3 model states
    out = {"shape": {"batch": B, "text_tokens": nt, "visual_tokens": nv, "width": d, "layers": LAYERS_7B,
                     "params": P_7B, "rdd_cap": cap, "rdd_tokens_after_cap": [n_t, n_v]},
           "gemm_flops_per_s": rate, "gemm_s": gemm["gemm_s"], "step_flops": sf, "step_time_est_s": step_s,
           "step_memory_est_bytes": sm, "terms": {}}
    for term in ("rdd", "pre"):
        r = run_worker("--_term", term, B, nt, nv, d, cap, args.b_reps)
        t = statistics.median(f + b for f, b in zip(r["fwd_s"], r["bwd_s"]))
        mem = r["extra_peak_bytes"] + (pre_states if term == "pre" else 0)
        out["terms"][term] = {**r, "time_s": t, "flops": terms[term], "time_frac": t / step_s,
                              "flops_frac": terms[term] / sf["total"], "extra_mem_bytes": mem,
                              "mem_frac": mem / sm["total"], "achieved_flops_per_s": terms[term] / t}
        out["terms"][term]["meets_target"] = all(out["terms"][term][k] <= TARGET
                                                 for k in ("time_frac", "flops_frac", "mem_frac"))
    rd = out["terms"]["rdd"]
    # RDD cost is ~quadratic in the cap: the largest cap under 1% of the step (time and FLOPs), extrapolated.
    worst = max(rd["time_frac"], rd["flops_frac"])
    out["rdd_cap_for_target"] = int(max(n_t, n_v) * math.sqrt(TARGET / worst)) if worst > 0 else None
    out["rdd_uncapped_flops_frac"] = rdd_flops(B * nt, B * nv, d) / sf["total"]

    print(f"\nPart B: LLaVA-1.5-7B shape, batch {B} x ({nt} text + {nv} visual) tokens, width {d}, {LAYERS_7B} layers;"
          f" terms fp32 on CPU, {args.b_reps} timed reps (median) after one cold pass")
    print(f"  CPU fp32 GEMM {d}^3: {rate / 1e9:.1f} GFLOP/s (median of 5)")
    print(f"  7B step FLOPs (est.) = 6*{P_7B:.1e}*{B * (nt + nv)} + attention 12*B*L^2*d*{LAYERS_7B} = "
          f"{sf['dense']:.3e} + {sf['attention']:.3e} = {sf['total']:.3e}  ->  {step_s:.0f} s at that GEMM rate")
    print(f"  7B per-GPU memory (est., ZeRO-3 x{GPUS}) = 16 B*{P_7B:.1e}/{GPUS} + {LAYERS_7B}*B*L*d*2 B = "
          f"{sm['model_states'] / 2**30:.2f} + {sm['checkpointed_activations'] / 2**30:.2f} = "
          f"{sm['total'] / 2**30:.2f} GiB")
    print(f"{'term':5s} {'fwd s':>7s} {'bwd s':>7s} {'time %step':>11s} {'GFLOP':>8s} {'FLOP %step':>11s} "
          f"{'extra MiB':>10s} {'mem %step':>10s} {'<=1%':>5s}")
    for term, r in out["terms"].items():
        print(f"{term:5s} {statistics.median(r['fwd_s']):7.2f} {statistics.median(r['bwd_s']):7.2f} "
              f"{100 * r['time_frac']:10.3f}% {r['flops'] / 1e9:8.0f} {100 * r['flops_frac']:10.3f}% "
              f"{r['extra_mem_bytes'] / 2**20:10.0f} {100 * r['mem_frac']:9.3f}% {'yes' if r['meets_target'] else 'NO':>5s}")
    print(f"  PRe extra memory includes its head's ZeRO-3 model states, 16 B*{2 * d * d + 2 * d}/{GPUS} = "
          f"{pre_states / 2**20:.0f} MiB")
    print(f"  RDD: cap for <=1% (quadratic extrapolation) ~ {out['rdd_cap_for_target']} tokens/modality; "
          f"uncapped ({B * nt}+{B * nv} tokens) FLOPs = {100 * out['rdd_uncapped_flops_frac']:.3f}% of the step")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_train":
        c, fx, out, *nums = sys.argv[2:]
        print(json.dumps(worker_train(c, fx, out, *map(int, nums))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--_term":
        print(json.dumps(worker_term(sys.argv[2], *map(int, sys.argv[3:]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run (fewer steps/repeats, batch 4 in B)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_overhead.json"))
    ap.add_argument("--skip", choices=["a", "b"], help="skip one part")
    args = ap.parse_args()
    q = args.quick
    args.a_hidden, args.a_layers, args.a_batch = 256, 8, 8
    args.a_steps, args.a_warmup, args.repeats = (5, 2, 1) if q else (12, 2, 3)
    args.b_batch, args.b_reps, args.rdd_cap = (4, 1, 4096) if q else (16, 3, 4096)
    import torch
    import transformers
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cpu": _cpu_model(), "quick": q, "argv": sys.argv}
    print(json.dumps(info))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res = {"info": info}
        if args.skip != "a":
            res["part_a"] = part_a(args, tmp)
        if args.skip != "b":
            res["part_b"] = part_b(args)
    res["info"]["wall_s"] = time.time() - t0
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwall {res['info']['wall_s']:.0f} s; JSON written to {args.json}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
