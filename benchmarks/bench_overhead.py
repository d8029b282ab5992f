"""Overhead of the regularizers: step time and peak memory (method and results: docs/benchmarks.md).

    PYTHONPATH=plugin python benchmarks/bench_overhead.py [--quick] [--json PATH] [--skip a|b] [--configs C ...]

(--configs: Part A's runs, e.g. `none distill "distill --distill_route all"`; a config is --regularizer's value
followed by any flags; `none` is always run, as the base of the ratios.)

A: CPU reference shape, end to end: upstream LLaVA train() on a widened tiny fixture, plain upstream and
   `llava-train --regularizer none|rdd|pre|rdd,pre`, one fresh 1-thread subprocess per run, configs interleaved
   over repeats. Step = on_step_begin -> on_step_end (fwd, bwd, optimizer); memory = peak RSS.
B: LLaVA-1.5-7B shape, the terms alone on CPU: time (fp32, against a GEMM timed just before each rep) and
   peak extra memory (fp32 and bf16 inputs) of forward+backward, against an *estimated* 7B step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = ["upstream", "none", "rdd", "pre", "rdd,pre", "distill"]
P_7B, LAYERS_7B, VOCAB_7B, GPUS, TARGET = 6.7e9, 32, 32000, 8, 0.01
MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # big buffers mmap'd, unmapped on free: RSS follows live memory
MIB, GIB = 2 ** 20, 2 ** 30
med = statistics.median


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def reset_peak() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS; return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def timed(fn, *a, **k):
    t = time.perf_counter()
    return fn(*a, **k), time.perf_counter() - t


def run_worker(*args, env_extra=None) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], capture_output=True,
                       text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def worker_train(config: str, fixture: str, out: str, steps: int, batch: int) -> dict:
    from pathlib import Path

    import torch
    import transformers.trainer as hf_trainer
    from transformers import TrainerCallback
    from transformers.models.llama import modeling_llama

    from vlm_preserve.testing.fixtures import TinyLlavaFixture

    class Probe(TrainerCallback):
        r = {"step_s": [], "cpu_s": [], "tokens": [], "padded": []}

        def on_train_begin(self, *a, **k):
            self.r["train_begin_rss"] = reset_peak()

        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.r["step_s"].append(time.perf_counter() - self.t0)
            self.r["cpu_s"].append(time.process_time() - self.c0)  # process CPU time: less hit by other load

        def on_train_end(self, *a, **k):
            self.r["peak_rss"] = _status("VmHWM")  # peak since train begin
            self.r["train_peak_rise"] = self.r["peak_rss"] - self.r["train_begin_rss"]

    probe = Probe()
    hf_trainer.DEFAULT_CALLBACKS.append(probe)  # the list Trainer.__init__ reads
    original = modeling_llama.LlamaModel.forward

    def forward(self, *a, **k):  # the shape the decoder sees: text + inserted visual tokens
        if self.training and k.get("inputs_embeds") is not None:
            probe.r["padded"].append(list(k["inputs_embeds"].shape))
            probe.r["tokens"].append(int(k["attention_mask"].sum()))
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
        main(argv + ["--regularizer", *config.split()])
    return probe.r


def worker_term(term: str, mode: str, dtype: str, B: int, nt: int, nv: int, d: int, cap: int, reps: int) -> dict:
    import torch
    from vlm_preserve.regularizers.pre import PReHead, head_pre_loss
    from vlm_preserve.regularizers.rdd import RDDConfig, mmd2, subsample

    torch.manual_seed(0)
    dt, rc = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], RDDConfig()
    if term == "rdd":  # stand-ins for text_embeds() / visual_embeds() (leaves: no slicing on the measured call)
        x, y = (torch.randn(B * n, d, dtype=dt).requires_grad_() for n in (nt, nv))
        inputs = [x, y]

        def fwd(seed, n=None, c=cap, blk=rc.rdd_block_size):
            g = torch.Generator().manual_seed(seed)
            xs, ys = (x, y) if n is None else (x[:n], y[:n])
            return mmd2(subsample(xs, c, g), subsample(ys, c, g), rc.rdd_kernel, rc.rdd_bandwidth_scale, blk)
    else:  # middle-layer visual hidden states -> head (in the model dtype, as Attachment casts it) -> loss, as PRe.loss
        head, anchor = PReHead(d, d).to(dt), torch.randn(B * nv, d, dtype=dt)
        h = torch.randn(B * nv, d, dtype=dt).requires_grad_()
        inputs = [h, *head.parameters()]

        def fwd(seed, n=None, **_):
            return head_pre_loss(head, h, anchor) if n is None else head_pre_loss(head, h[:n], anchor[:n])
    if mode == "mem":
        fwd(0, n=300, c=256, blk=128).backward()  # same code paths on a small slice: page in code, start pools
        for p in inputs:
            p.grad = None
        base = reset_peak()
        fwd(0).backward()
        return {"extra_peak_bytes": _status("VmHWM") - base}
    a, b, c = (torch.randn(d, d) for _ in range(3))
    gemm = lambda: med([timed(torch.mm, a, b, out=c)[1] for _ in range(3)])  # noqa: E731  fp32 d^3, median of 3
    gemm(), fwd(0).backward()  # warm-up
    out = {"fwd_s": [], "bwd_s": [], "gemm_s": []}
    for r in range(reps):
        for p in inputs:
            p.grad = None
        out["gemm_s"].append(gemm())
        loss, tf = timed(fwd, r + 1)
        out["fwd_s"].append(tf)
        out["bwd_s"].append(timed(loss.backward)[1])
    return out


def rdd_flops(n_t, n_v, d):  # kernel matmuls 2d(n_t²+n_v²+n_t·n_v); bwd = recomputed fwd + 2 operand grads
    return 4 * 2 * d * (n_t ** 2 + n_v ** 2 + n_t * n_v)


def pre_flops(n, d, d_out):  # two Linear layers; bwd = weight + input gradients
    return 3 * 2 * n * (d * d + d * d_out)


def step_flops(B, L, d):  # attention: QK^T and AV, 2·L²·d each per layer and sample, fwd + 2x bwd, no causal halving
    f = {"dense": 6 * P_7B * B * L, "attention": 3 * 4 * B * L ** 2 * d * LAYERS_7B}
    return {**f, "total": sum(f.values())}


def step_memory(B, L, d):  # a LOWER bound of the 7B step's per-GPU peak, so the fractions are upper bounds
    m = {"model_states": 16 * P_7B / GPUS,                        # bf16 w+g, fp32 master + Adam m, v; ZeRO-3
         "checkpointed_layer_inputs": LAYERS_7B * B * L * d * 2,  # bf16, gradient checkpointing
         "fp32_logits": 4 * B * L * VOCAB_7B}                     # LlamaForCausalLM: logits.float()
    return {**m, "total": sum(m.values())}


def part_a(args, tmp: str) -> dict:
    from vlm_preserve.testing.fixtures import build_tiny_llava
    fx = build_tiny_llava(os.path.join(tmp, "fx"), hidden_size=args.a_hidden, layers=args.a_layers,
                          n_image_samples=48, n_text_samples=16)
    configs = list(dict.fromkeys(["none", *args.configs]))
    runs = {c: [] for c in configs}
    for rep in range(args.repeats):
        for c in (configs if rep % 2 == 0 else configs[::-1]):
            r = run_worker("--_train", c, fx.root, os.path.join(tmp, f"r{rep}{c}"), args.a_steps, args.a_batch,
                           env_extra={"OMP_NUM_THREADS": "1"})  # 1 thread: CPU time = work, even under other load
            r["median_step_s"], r["median_cpu_s"] = med(r["step_s"][args.a_warmup:]), med(r["cpu_s"][args.a_warmup:])
            runs[c].append(r)
            print(f"  A rep {rep} {c:8s} {r['median_step_s'] * 1e3:7.1f} ms/step, {r['median_cpu_s'] * 1e3:7.1f} "
                  "CPU ms/step", flush=True)
    keys = ("median_step_s", "median_cpu_s", "peak_rss", "train_peak_rise")
    w = args.a_warmup  # same seed: every config sees the same batches in the same order -> per-step ratios
    paired = lambda c, k: med(a / b for rc, rn in zip(runs[c], runs["none"])  # noqa: E731
                              for a, b in zip(rc[k][w:], rn[k][w:]))
    res = {c: {**{k: med(r[k] for r in runs[c]) for k in keys}, "paired_wall": paired(c, "step_s"),
               "paired_cpu": paired(c, "cpu_s"),
               "runs": [{k: r[k] for k in ("step_s", "cpu_s", *keys[2:])} for r in runs[c]]} for c in configs}
    r0, n = runs["none"][0], res["none"]
    lens = [s[1] for s in r0["padded"]]
    shape = {"batch": args.a_batch, "hidden": args.a_hidden, "layers": args.a_layers, "threads": 1,
             "steps": args.a_steps, "warmup_steps_dropped": args.a_warmup, "repeats": args.repeats,
             "padded_len": [min(lens), max(lens)], "visual_tokens_per_image": 16,
             "mean_attended_tokens_per_batch": statistics.mean(r0["tokens"])}
    print(f"\nPart A: CPU reference shape, upstream LLaVA train(), batch {args.a_batch}, width {args.a_hidden}, "
          f"{args.a_layers} layers (4 heads, MLP {2 * args.a_hidden}), 1 thread, padded length {min(lens)}.."
          f"{max(lens)}, mean {shape['mean_attended_tokens_per_batch']:.0f} attended tokens/batch (16 visual/image); "
          f"median of {args.repeats} runs, each the median of {args.a_steps - args.a_warmup} steps")
    print(f"{'config':30s} {'wall ms':>8s} {'x none':>7s} {'CPU ms':>8s} {'x none':>7s} {'peak RSS MiB':>13s} "
          f"{'x none':>7s} {'rise MiB':>9s}")
    for c in configs:
        r = res[c]
        print(f"{c:30s} {r['median_step_s'] * 1e3:8.1f} {r['paired_wall']:7.3f} {r['median_cpu_s'] * 1e3:8.1f} "
              f"{r['paired_cpu']:7.3f} {r['peak_rss'] / MIB:13.0f} {r['peak_rss'] / n['peak_rss']:7.3f} "
              f"{r['train_peak_rise'] / MIB:9.1f}")
    print("  wall/CPU ms: per step, median over steps then runs; CPU = process CPU time (1 torch thread);\n"
          "  x none: median over (repeat, step) of the ratio to none's time on the same batch;\n"
          "  peak RSS: whole process, peak during train() (VmHWM reset at train begin); rise: that peak - RSS at begin")
    return {"shape": shape, "configs": res}


def part_b(args) -> dict:
    from vlm_preserve.regularizers.rdd import RDDConfig
    rc = RDDConfig()  # the defaults a user gets
    B, nt, nv, d, cap = args.b_batch, 600, 576, 4096, rc.rdd_max_tokens
    sf, sm = step_flops(B, nt + nv, d), step_memory(B, nt + nv, d)
    flops = {"rdd": rdd_flops(min(cap, B * nt), min(cap, B * nv), d), "pre": pre_flops(B * nv, d, d)}
    head_states = 16 * (2 * d * d + 2 * d) / GPUS  # the PRe head's own ZeRO-3 model states
    out = {"shape": {"batch": B, "text_tokens": nt, "visual_tokens": nv, "width": d, "layers": LAYERS_7B,
                     "params": P_7B, "vocab": VOCAB_7B, "gpus": GPUS, "rdd_cap": cap,
                     "rdd_block": rc.rdd_block_size, "rdd_kernel": rc.rdd_kernel},
           "step_flops": sf, "step_memory_est_bytes": sm,
           "pre_head_zero3_states_bytes": head_states}
    for term in ("rdd", "pre"):
        r = run_worker("--_term", term, "time", "fp32", B, nt, nv, d, cap, args.b_reps)
        tot = [f + b for f, b in zip(r["fwd_s"], r["bwd_s"])]
        r["gemm_flops_per_s"] = [2 * d ** 3 / g for g in r["gemm_s"]]
        r.update(time_s=med(tot), flops=flops[term], flops_frac=flops[term] / sf["total"],
                 time_frac=med(t * q / sf["total"] for t, q in zip(tot, r["gemm_flops_per_s"])))
        for dt in ("fp32", "bf16"):
            m = run_worker("--_term", term, "mem", dt, B, nt, nv, d, cap, 0, env_extra=MEM_ENV)["extra_peak_bytes"]
            r[f"mem_{dt}_bytes"] = m + (head_states if term == "pre" else 0)
            r[f"mem_{dt}_frac"] = r[f"mem_{dt}_bytes"] / sm["total"]
        r["meets"] = {k: r[k] <= TARGET for k in ("time_frac", "flops_frac", "mem_fp32_frac", "mem_bf16_frac")}
        out[term] = r
    rd, rates = out["rdd"], out["rdd"]["gemm_flops_per_s"] + out["pre"]["gemm_flops_per_s"]
    rate = out["gemm_fp32_flops_per_s"] = max(rates)  # the least disturbed by other load
    step_s = out["step_time_est_s"] = sf["total"] / rate
    worst = max(rd["time_frac"], rd["flops_frac"])  # kernel matmuls are quadratic in the cap
    out["rdd_cap_for_time_target"] = int(min(cap, B * nt) * math.sqrt(TARGET / worst)) if worst > TARGET else None
    out["rdd_uncapped_flops_frac"] = rdd_flops(B * nt, B * nv, d) / sf["total"]
    out["rdd_mem_bf16_by_cap"] = {cap: rd["mem_bf16_bytes"]}
    if rd["mem_bf16_frac"] > TARGET:  # memory is not quadratic in the cap: measure smaller caps
        for c in (cap // 2, cap // 4):
            out["rdd_mem_bf16_by_cap"][c] = run_worker("--_term", "rdd", "mem", "bf16", B, nt, nv, d, c, 0,
                                                       env_extra=MEM_ENV)["extra_peak_bytes"]
    print(f"\nPart B: LLaVA-1.5-7B shape, batch {B} x ({nt} text + {nv} visual) tokens, width {d}, {LAYERS_7B} "
          f"layers; RDD kernel {rc.rdd_kernel}, cap {cap}/modality, block {rc.rdd_block_size}; CPU")
    print(f"  CPU fp32 GEMM {d}^3: best {rate / 1e9:.1f} GFLOP/s (median {med(rates) / 1e9:.1f}, min "
          f"{min(rates) / 1e9:.1f} over {len(rates)} samples, each the median of 3, timed just before a term rep)")
    print(f"  7B step FLOPs (est.) = 6*{P_7B:.2g}*{B * (nt + nv)} tokens + attention 12*B*L^2*d*{LAYERS_7B} = "
          f"{sf['dense']:.3e} + {sf['attention']:.3e} = {sf['total']:.3e}  ->  {step_s:.0f} s at the best rate")
    print(f"  7B per-GPU memory (est., lower bound; ZeRO-3 on {GPUS}) = 16 B*{P_7B:.2g}/{GPUS} + {LAYERS_7B}*B*L*d*2 B"
          f" + 4 B*B*L*{VOCAB_7B} = {sm['model_states'] / GIB:.2f} + {sm['checkpointed_layer_inputs'] / GIB:.2f}"
          f" + {sm['fp32_logits'] / GIB:.2f} = {sm['total'] / GIB:.2f} GiB")
    print(f"{'term':5s} {'fwd s':>6s} {'bwd s':>6s} {'time %':>7s} {'GFLOP':>6s} {'FLOP %':>7s} {'MiB fp32':>9s} "
          f"{'mem %':>6s} {'MiB bf16':>9s} {'mem %':>6s}  <=1%: time FLOP mem32 mem16")
    for term in ("rdd", "pre"):
        r = out[term]
        print(f"{term:5s} {med(r['fwd_s']):6.2f} {med(r['bwd_s']):6.2f} {100 * r['time_frac']:6.3f}% "
              f"{r['flops'] / 1e9:6.0f} {100 * r['flops_frac']:6.3f}% {r['mem_fp32_bytes'] / MIB:9.0f} "
              f"{100 * r['mem_fp32_frac']:5.2f}% {r['mem_bf16_bytes'] / MIB:9.0f} {100 * r['mem_bf16_frac']:5.2f}%  "
              + " ".join("yes" if v else "NO" for v in r["meets"].values()))
    print(f"  fwd/bwd: fp32, median of {args.b_reps} after a warm-up; time % = median over reps of fwd+bwd / est. "
          f"step time at that rep's GEMM rate; mem = peak rise over one fwd+bwd, inputs excluded; PRe mem includes "
          f"its head's ZeRO-3 states ({head_states / MIB:.0f} MiB); <=1% would need a step peak >= "
          f"{rd['mem_bf16_bytes'] / TARGET / GIB:.0f} GiB (RDD bf16), "
          f"{out['pre']['mem_bf16_bytes'] / TARGET / GIB:.0f} GiB (PRe bf16)")
    c4 = out["rdd_cap_for_time_target"]
    print(f"  RDD time/FLOPs: cap {cap} " + (f"misses 1%; cap ~{c4} would meet it (quadratic extrapolation)" if c4
          else "meets 1%") + f"; uncapped ({B * nt}+{B * nv} tokens) its FLOPs would be "
          f"{100 * out['rdd_uncapped_flops_frac']:.3f}% of the step")
    print("  RDD memory, bf16 inputs, by cap: " + ", ".join(
        f"{c}: {m / MIB:.0f} MiB = {100 * m / sm['total']:.2f}%" for c, m in out["rdd_mem_bf16_by_cap"].items()))
    return out


def main() -> None:
    if sys.argv[1:2] == ["--_train"]:
        c, fx, out, *nums = sys.argv[2:]
        return print(json.dumps(worker_train(c, fx, out, *map(int, nums))))
    if sys.argv[1:2] == ["--_term"]:
        return print(json.dumps(worker_term(*sys.argv[2:5], *map(int, sys.argv[5:]))))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~2 minute smoke run: fewer steps/repeats, batch 2 in B")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_overhead.json"))
    ap.add_argument("--skip", choices=["a", "b"], help="skip one part")
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="Part A's configs (default: %(default)s)")
    args = ap.parse_args()
    args.a_hidden, args.a_layers, args.a_batch = 256, 8, 8
    args.a_steps, args.a_warmup, args.repeats = (5, 2, 1) if args.quick else (12, 2, 3)
    args.b_batch, args.b_reps = (2, 1) if args.quick else (16, 3)
    import torch
    import transformers
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    info = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__, "quick": args.quick,
            "loadavg_start": os.getloadavg()}
    print(json.dumps(info))
    t0, res = time.time(), {"info": info}
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "a":
            res["part_a"] = part_a(args, tmp)
        if args.skip != "b":
            res["part_b"] = part_b(args)
    info.update(wall_s=time.time() - t0, loadavg_end=os.getloadavg())
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwall {info['wall_s']:.0f} s; 1-min load average at start {info['loadavg_start'][0]:.2f}, at end "
          f"{info['loadavg_end'][0]:.2f} ({os.cpu_count()} CPUs; our runs alone load ~1 in A, ~2 in B: "
          f"more means other processes competed); JSON: {args.json}")


if __name__ == "__main__":
    main()
