"""Overhead of the regularizers: step time and peak memory (method and results: docs/benchmarks.md).

    PYTHONPATH=plugin python benchmarks/bench_overhead.py [--quick] [--json PATH] [--skip a|b] [--configs C ...]
                                                        [--b-runs R ...]

(--configs: Part A's runs, e.g. `none distill "distill --distill_route all"`; a config is --regularizer's value
followed by any flags; `none` is always run, as the base of the ratios. --b-runs: Part B's measurements, so that
a long Part B can be split over several invocations; default: all of B_RUNS.)

A: CPU reference shape, end to end: upstream LLaVA train() on a widened tiny fixture, plain upstream and
   `llava-train --regularizer none|rdd|pre|rdd,pre`, one fresh 1-thread subprocess per run, configs interleaved
   over repeats. Step = on_step_begin -> on_step_end (fwd, bwd, optimizer); memory = peak RSS.
C (--gpu-1b; benchmarks/gpu_check.sh runs it, CUDA only): a ~1B VLM (transformers' Llava: TinyLlama-1.1B's LLM, a
   4-layer CLIP-L/14-336 tower, random weights, bf16), the HF Trainer with gradient checkpointing, batch 4 x (600 text
   + 576 image tokens); plain Trainer (`none`) and attach(rdd | pre | distill), one fresh process each: median step
   time (CUDA-synchronised) and peak CUDA memory, as ratios to `none`.
B: LLaVA-1.5-7B shape, the terms alone on CPU: time (fp32, against a GEMM timed just before each rep; RDD's
   current and previous implementations side by side, alternating) and peak extra memory of forward+backward,
   split into the term's own memory and its inputs' gradients, against an *estimated* 7B step.
"""
from __future__ import annotations

import argparse
import json
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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_START = 35  # where the 576 image tokens begin in each sample (after LLaVA's system prompt)
# Part B's measurements. time:TERM = the term's current (new) and previous (old) implementations timed side by side
# (RDD old: checkpointed row blocks, tests/helpers/rdd_checkpointed.py; PRe old: checkpointed token chunks sliced
# from h under autograd, tests/helpers/pre_checkpointed.py; PRe zero3: the branch head_pre_loss takes under
# DeepSpeed ZeRO-3, its parameters marked as DeepSpeed's, one process, the gathers' full weights allocated); mem:TERM:IMPL:INPUTS:DTYPE:CAP = one
# fwd+bwd's peak memory. INPUTS: `embeds` = the production path (RDD.loss on a (B, L, d) inputs_embeds and its
# masks), `leaves` = the text and visual tokens as two separate leaf tensors (how runs 1-3 measured). CAP 0 = none.
B_RUNS = ["time:rdd", "time:pre",
          "mem:rdd:new:embeds:bf16:4096", "mem:rdd:old:embeds:bf16:4096", "mem:rdd:new:leaves:bf16:4096",
          "mem:rdd:old:leaves:bf16:4096", "mem:rdd:new:embeds:fp32:4096", "mem:rdd:new:embeds:bf16:0",
          "mem:pre:new:leaves:bf16:0", "mem:pre:old:leaves:bf16:0", "mem:pre:new:leaves:fp32:0",
          "mem:pre:old:leaves:fp32:0"]
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


def gemm_rate(d: int, reps: int = 3) -> float:
    """fp32 d³ GEMM FLOP/s, median of `reps`: the machine's speed just now, stated beside every timing."""
    import torch
    a, b, c = (torch.randn(d, d) for _ in range(3))
    return 2 * d ** 3 / med([timed(torch.mm, a, b, out=c)[1] for _ in range(reps)])


def term_setup(term: str, impl: str, inputs: str, dtype: str, B: int, nt: int, nv: int, d: int, cap: int):
    """(fwd(seed, small=False) -> loss, the tensors whose gradients the backward makes). `small`: the same code
    on a slice, to page in code and start thread pools before anything is measured."""
    import torch
    from vlm_preserve.capture import StepCapture
    from vlm_preserve.regularizers.pre import PReHead, head_pre_loss
    from vlm_preserve.regularizers.rdd import RDD, RDDConfig, mmd2, sample_rows
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import pre_checkpointed
    from helpers import rdd_checkpointed as old

    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if term == "pre":  # middle-layer visual hidden states -> head (in the model dtype, as Attachment casts it)
        head, anchor = PReHead(d, d).to(dt), torch.randn(B * nv, d, dtype=dt)
        h = torch.randn(B * nv, d, dtype=dt).requires_grad_()
        loss = pre_checkpointed.head_pre_loss if impl == "old" else head_pre_loss
        if impl == "zero3":  # the branch head_pre_loss takes under DeepSpeed ZeRO-3, in one process
            for p in head.parameters():
                p.ds_id = 0
            _fake_zero3_gather()
        return (lambda seed, small=False: loss(head, h[:300] if small else h, anchor[:300] if small
                                               else anchor)), [h, *head.parameters()]
    cfg = RDDConfig(rdd_max_tokens=cap)
    small_cfg = RDDConfig(rdd_max_tokens=min(cap, 256) if cap else 256, rdd_block_size=128)
    if inputs == "leaves":  # stand-ins for text_embeds() / visual_embeds(), as runs 1-3 measured
        x, y = (torch.randn(B * n, d, dtype=dt).requires_grad_() for n in (nt, nv))

        def fwd(seed, small=False):
            c = small_cfg if small else cfg
            g = torch.Generator().manual_seed(seed)
            xs, ys = (x[:300], y[:300]) if small else (x, y)
            if impl == "old":
                return old.mmd2(old.subsample(xs, c.rdd_max_tokens, g), old.subsample(ys, c.rdd_max_tokens, g),
                                c.rdd_kernel, c.rdd_bandwidth_scale, c.rdd_block_size)
            rx, ry = (sample_rows(t.shape[0], c.rdd_max_tokens, g) for t in (xs, ys))
            return mmd2(xs, ys, c.rdd_kernel, c.rdd_bandwidth_scale, c.rdd_block_size, x_rows=rx, y_rows=ry)
        return fwd, [x, y]
    # embeds: what the adapter captures, each sample 600 text + 576 image tokens, all attended
    e = torch.randn(B, nt + nv, d, dtype=dt).requires_grad_()
    img = torch.zeros(B, nt + nv, dtype=torch.bool)
    img[:, IMAGE_START:IMAGE_START + nv] = True
    attn = torch.ones_like(img)

    def fwd(seed, small=False):
        c = small_cfg if small else cfg
        cp = (StepCapture(inputs_embeds=e[:1, :300], image_mask=img[:1, :300], attention_mask=attn[:1, :300],
                          step_seed=seed) if small else
              StepCapture(inputs_embeds=e, image_mask=img, attention_mask=attn, step_seed=seed))
        return (old.rdd_loss(cp, c) if impl == "old" else RDD(c).loss(cp))[0]
    return fwd, [e]


def _fake_zero3_gather() -> None:
    """DeepSpeed's GatheredParameters for one process: it allocates (and touches) the full weights a real ZeRO-3
    gather would, for as long as the context lasts, so the memory rows count the gathered head."""
    import contextlib
    import types

    import torch

    @contextlib.contextmanager
    def gathered(params):
        full = torch.empty(sum(p.numel() * p.element_size() for p in params), dtype=torch.uint8).fill_(1)
        try:
            yield
        finally:
            del full

    sys.modules["deepspeed"] = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=gathered))


def worker_term(term: str, mode: str, dtype: str, impl: str, inputs: str, B: int, nt: int, nv: int, d: int,
                cap: int, reps: int) -> dict:
    """mode mem: peak memory of one fwd+bwd. mode time: fwd and bwd times; for RDD, old and new alternating."""
    if mode == "mem":
        fwd, params = term_setup(term, impl, inputs, dtype, B, nt, nv, d, cap)
        fwd(0, small=True).backward()
        for p in params:
            p.grad = None
        base = reset_peak()  # inputs (and the PRe head) allocated: not counted
        loss, tf = timed(fwd, 0)
        fwd_peak = _status("VmHWM") - base
        reset_peak()
        tb = timed(loss.backward)[1]
        bwd_peak = _status("VmHWM") - base  # forward's leftovers (the saved tensors) included
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        # The inputs' gradients are alive from the start of the new RDD's backward to its end (it allocates them
        # first), so subtracting them from the backward's peak leaves its own memory exactly; for a path that
        # makes them later (old RDD: at its last nodes; old PRe: chunk by chunk), it is a lower bound of its own
        # memory. New PRe allocates its gradients (h's and the head's) first too, and holds them to its end: exact.
        return {"extra_peak_bytes": max(fwd_peak, bwd_peak), "fwd_peak_bytes": fwd_peak, "bwd_peak_bytes": bwd_peak,
                "input_grad_bytes": grads, "own_peak_bytes": max(fwd_peak, bwd_peak - grads),
                "fwd_s": tf, "bwd_s": tb, "note": "times under MALLOC_MMAP_THRESHOLD_: indicative only"}
    impls = ["new", "old"] if impl != "zero3" else ["zero3"]
    runs = {i: term_setup(term, i, inputs, dtype, B, nt, nv, d, cap) for i in impls}
    for fwd, _ in runs.values():
        fwd(0, small=True).backward()
    gemm_rate(d, 1)  # warm-up
    out = {i: {"fwd_s": [], "bwd_s": []} for i in impls}
    out["gemm_flops_per_s"] = []
    for r in range(reps):
        out["gemm_flops_per_s"].append(gemm_rate(d))
        for i in (impls if r % 2 == 0 else impls[::-1]):
            fwd, params = runs[i]
            for p in params:
                p.grad = None
            loss, tf = timed(fwd, r + 1)
            out[i]["fwd_s"].append(tf)
            out[i]["bwd_s"].append(timed(loss.backward)[1])
            loss = None
    return out


GPU_1B = {"text": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
          "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                         image_size=336, patch_size=14),
          "batch": 4, "text_tokens": 600, "image_tokens": 576}


def worker_gpu(config: str, out: str, attn: str, steps: int, warmup: int) -> dict:
    import torch
    import transformers as T

    from vlm_preserve import attach
    from vlm_preserve.compat import dtype_kwarg
    torch.manual_seed(0)
    g, image_id = GPU_1B, GPU_1B["text"]["vocab_size"] - 1
    cfg = T.LlavaConfig(text_config=T.LlamaConfig(**g["text"]), vision_config=T.CLIPVisionConfig(**g["vision"]),
                        image_token_id=image_id)
    with torch.device("cuda"):
        model = T.LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn,
                                                             **dtype_kwarg(torch.bfloat16))
    B, nt, nv = g["batch"], g["text_tokens"], g["image_tokens"]
    batches = []
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        ids = torch.randint(5, 31000, (B, nt + nv), generator=gen)
        ids[:, IMAGE_START:IMAGE_START + nv] = image_id
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": ids.masked_fill(ids == image_id, -100),
                        "pixel_values": torch.randn(B, 3, 336, 336, generator=gen).to(torch.bfloat16)})
    args = T.TrainingArguments(output_dir=out, per_device_train_batch_size=B, max_steps=steps, bf16=True,
                               gradient_checkpointing=True, learning_rate=1e-5, logging_steps=1, save_strategy="no",
                               report_to="none", remove_unused_columns=False, disable_tqdm=True, seed=0)
    r = {"step_s": []}

    class Probe(T.TrainerCallback):
        def on_train_begin(self, *a, **k):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            r["step_s"].append(time.perf_counter() - self.t0)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    trainer = T.Trainer(model=model, args=args, train_dataset=Items(), data_collator=lambda xs: xs[0],
                        callbacks=[Probe()])
    if config != "none":
        teacher = None
        if config == "distill":  # the student's own LLM as teacher: same shape and cost as the real one
            with torch.device("cuda"):
                teacher = T.LlamaForCausalLM._from_config(cfg.text_config, attn_implementation=attn,
                                                          **dtype_kwarg(torch.bfloat16))
        attach(trainer, config, teacher=teacher)
    trainer.train()
    r.update(median_step_s=med(r["step_s"][warmup:]), peak_cuda_bytes=torch.cuda.max_memory_allocated(),
             params=sum(p.numel() for p in model.parameters()), device=torch.cuda.get_device_name(),
             attn=attn)
    return r


def part_c(args, tmp: str) -> dict:
    try:
        import flash_attn  # noqa: F401
        attn = "flash_attention_2"
    except ImportError:
        attn = "sdpa"
    configs, runs = ["none", "rdd", "pre", "distill"], {}
    for c in configs:
        runs[c] = run_worker("--_gpu", c, os.path.join(tmp, c), attn, args.c_steps, args.c_warmup)
        print(f"  C {c:8s} {runs[c]['median_step_s'] * 1e3:8.1f} ms/step, peak {runs[c]['peak_cuda_bytes'] / GIB:.2f} GiB",
              flush=True)
    n = runs["none"]
    for c in configs:
        runs[c].update(time_ratio=runs[c]["median_step_s"] / n["median_step_s"],
                       mem_ratio=runs[c]["peak_cuda_bytes"] / n["peak_cuda_bytes"])
    print(f"\nPart C: ~1B VLM on {n['device']} ({n['params'] / 1e9:.2f} B params, {attn}, bf16, gradient "
          f"checkpointing), batch {GPU_1B['batch']} x ({GPU_1B['text_tokens']} text + {GPU_1B['image_tokens']} image)"
          f" tokens; median of {args.c_steps - args.c_warmup} steps")
    print(f"{'config':8s} {'ms/step':>8s} {'x none':>7s} {'peak GiB':>9s} {'x none':>7s}")
    for c in configs:
        r = runs[c]
        print(f"{c:8s} {r['median_step_s'] * 1e3:8.1f} {r['time_ratio']:7.3f} {r['peak_cuda_bytes'] / GIB:9.2f} "
              f"{r['mem_ratio']:7.3f}")
    return {"shape": GPU_1B, "attn": attn, "configs": runs}


def rdd_flops(n_t, n_v, d):  # old: kernel matmuls 2d(n_t²+n_v²+n_t·n_v); bwd = recomputed fwd + 2 operand grads
    return 4 * 2 * d * (n_t ** 2 + n_v ** 2 + n_t * n_v)


def rdd_flops_new(n_t, n_v, d):  # fwd: upper triangle within each modality (diagonal tiles ignored) + all cross
    # tiles; bwd: every tile of the pooled sample recomputed, then its (tile @ rows) product
    return 2 * d * (n_t ** 2 / 2 + n_v ** 2 / 2 + n_t * n_v) + 2 * 2 * d * (n_t + n_v) ** 2


def pre_flops(n, d, d_out):  # two Linear layers: fwd, the recompute in bwd (both paths since run 2), weight + input
    return 4 * 2 * n * (d * d + d * d_out)  # gradients (runs 1-3 counted 3, leaving the recompute out)


def step_flops(B, L, d):  # attention: QK^T and AV, 2·L²·d each per layer and sample, fwd + 2x bwd, no causal halving
    f = {"dense": 6 * P_7B * B * L, "attention": 3 * 4 * B * L ** 2 * d * LAYERS_7B}
    return {**f, "total": sum(f.values())}


def step_memory(B, L, d, dtype="bf16"):  # a LOWER bound of the 7B step's per-GPU peak: fractions are upper bounds
    act = {"bf16": 2, "fp32": 4}[dtype]
    m = {"model_states": 16 * P_7B / GPUS,      # bf16 w+g + fp32 master + Adam m, v; or fp32 w, g, m, v; ZeRO-3
         "checkpointed_layer_inputs": LAYERS_7B * B * L * d * act,  # in the step's dtype, gradient checkpointing
         "fp32_logits": 4 * B * L * VOCAB_7B}   # LlamaForCausalLM: logits.float()
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
    sm_dtype = {t: step_memory(B, nt + nv, d, t) for t in ("bf16", "fp32")}  # each mem run against its dtype's bound
    capped = lambda c: (min(c, B * nt) if c else B * nt, min(c, B * nv) if c else B * nv)  # noqa: E731
    flops = {"rdd:new": lambda c: rdd_flops_new(*capped(c), d), "rdd:old": lambda c: rdd_flops(*capped(c), d),
             "pre:new": lambda c: pre_flops(B * nv, d, d), "pre:old": lambda c: pre_flops(B * nv, d, d)}
    head_states = 16 * (2 * d * d + 2 * d) / GPUS  # the PRe head's own ZeRO-3 model states
    out = {"shape": {"batch": B, "text_tokens": nt, "visual_tokens": nv, "width": d, "layers": LAYERS_7B,
                     "params": P_7B, "vocab": VOCAB_7B, "gpus": GPUS, "rdd_cap": cap, "image_start": IMAGE_START,
                     "rdd_block": rc.rdd_block_size, "rdd_kernel": rc.rdd_kernel, "torch_threads": 1},
           "step_flops": sf, "step_memory_est_bytes": sm, "step_memory_est_bytes_by_dtype": sm_dtype, "pre_head_zero3_states_bytes": head_states,
           "rdd_uncapped_flops_frac": {"new": flops["rdd:new"](0) / sf["total"], "old": flops["rdd:old"](0) / sf["total"]},
           "runs": {}}
    one_thread = {"OMP_NUM_THREADS": "1"}  # so that CPU time is work, whatever else the machine runs
    for run in args.b_runs:
        kind, term, *rest = run.split(":")
        if kind == "time":
            r = run_worker("--_term", term, "time", "fp32", "new", "embeds" if term == "rdd" else "leaves", B, nt, nv,
                           d, cap, args.b_reps, env_extra=one_thread)
            rates = r["gemm_flops_per_s"]
            for impl in [k for k in ("new", "old") if k in r]:
                tot = [f + b for f, b in zip(r[impl]["fwd_s"], r[impl]["bwd_s"])]
                fl = flops[f"{term}:{impl}"](cap)
                r[impl].update(total_s=tot, time_s=med(tot), flops=fl, flops_frac=fl / sf["total"],
                               time_frac=med(t * q / sf["total"] for t, q in zip(tot, rates)))
            if "old" in r:  # paired: the two ran one after the other in each rep, at about the same machine speed
                r["new_over_old"] = med(n / o for n, o in zip(r["new"]["total_s"], r["old"]["total_s"]))
        else:
            impl, inputs, dtype, c = rest
            r = run_worker("--_term", term, "mem", dtype, impl, inputs, B, nt, nv, d, int(c), 0,
                           env_extra={**MEM_ENV, **one_thread})
            if term == "pre":  # under ZeRO-3 the head's states are the term's own too
                r["own_peak_bytes"] += head_states
                r["extra_peak_bytes"] += head_states
            bound = sm_dtype[dtype]["total"]
            r.update(own_frac=r["own_peak_bytes"] / bound, extra_frac=r["extra_peak_bytes"] / bound, bound_bytes=bound)
        out["runs"][run] = r
        print(f"  B {run} done", flush=True)
    print(f"\nPart B: LLaVA-1.5-7B shape, batch {B} x ({nt} text + {nv} visual) tokens, width {d}, {LAYERS_7B} "
          f"layers; RDD kernel {rc.rdd_kernel}, block {rc.rdd_block_size}; CPU, 1 torch thread")
    print(f"  7B step FLOPs (est.) = 6*{P_7B:.2g}*{B * (nt + nv)} tokens + attention 12*B*L^2*d*{LAYERS_7B} = "
          f"{sf['dense']:.3e} + {sf['attention']:.3e} = {sf['total']:.3e}")
    print(f"  7B per-GPU memory (est., lower bound; ZeRO-3 on {GPUS}) = 16 B*{P_7B:.2g}/{GPUS} + {LAYERS_7B}*B*L*d*2 B"
          f" + 4 B*B*L*{VOCAB_7B} = {sm['model_states'] / GIB:.2f} + {sm['checkpointed_layer_inputs'] / GIB:.2f}"
          f" + {sm['fp32_logits'] / GIB:.2f} = {sm['total'] / GIB:.2f} GiB in bf16; fp32 (activations 4 B): "
          f"{sm_dtype['fp32']['total'] / GIB:.2f} GiB")
    times = {k: v for k, v in out["runs"].items() if k.startswith("time:")}
    if times:
        print(f"{'time run':10s} {'impl':4s} {'fwd s':>6s} {'bwd s':>6s} {'new/old':>7s} {'time %':>7s} {'GFLOP':>6s} "
              f"{'FLOP %':>7s}  GEMM GFLOP/s (median, min..max over reps)")
        for run, r in times.items():
            g = [q / 1e9 for q in r["gemm_flops_per_s"]]
            for impl in [k for k in ("new", "old") if k in r]:
                t = r[impl]
                print(f"{run:10s} {impl:4s} {med(t['fwd_s']):6.2f} {med(t['bwd_s']):6.2f} "
                      f"{r['new_over_old'] if impl == 'new' and 'old' in r else float('nan'):7.3f} "
                      f"{100 * t['time_frac']:6.3f}% {t['flops'] / 1e9:6.0f} {100 * t['flops_frac']:6.3f}%  "
                      f"{med(g):.1f} ({min(g):.1f}..{max(g):.1f})")
        print(f"  fp32, 1 thread, median of {args.b_reps} reps after a warm-up on a slice; RDD through RDD.loss on a "
              f"(B, L, d) inputs_embeds, PRe through head_pre_loss, new and old alternating in each rep; new/old = median "
              f"over reps of the paired fwd+bwd ratio; time % = median over reps of fwd+bwd / est. step time at the GEMM rate timed "
              f"just before that rep (fp32 {d}^3, median of 3)")
    mems = {k: v for k, v in out["runs"].items() if k.startswith("mem:")}
    if mems:
        print(f"{'mem run':30s} {'fwd MiB':>8s} {'bwd MiB':>8s} {'in.grad':>8s} {'own MiB':>8s} {'own %':>6s} "
              f"{'total':>7s} {'total %':>7s}  own <=1%")
        for run, r in mems.items():
            print(f"{run:30s} {r['fwd_peak_bytes'] / MIB:8.0f} {r['bwd_peak_bytes'] / MIB:8.0f} "
                  f"{r['input_grad_bytes'] / MIB:8.0f} {r['own_peak_bytes'] / MIB:8.0f} {100 * r['own_frac']:5.2f}% "
                  f"{r['extra_peak_bytes'] / MIB:7.0f} {100 * r['extra_frac']:6.2f}%  "
                  f"{'yes' if r['own_frac'] <= TARGET else 'NO'}")
        print("  mem:TERM:IMPL:INPUTS:DTYPE:CAP; peak RSS rise over the RSS with the inputs allocated (1 thread, "
              "big buffers mmap'd): fwd = during the forward, bwd = during the backward (the forward's saved tensors "
              "included); in.grad = the bytes of the inputs' gradients (PRe: h and the head's parameters); own = "
              "max(fwd, bwd - in.grad), exact for RDD new and PRe new (their gradients live through their whole "
              "backward), a lower bound for the old paths (theirs appear late in their backward); total = max(fwd, bwd), "
              "what runs 1-3 reported; PRe own and total include its "
              f"head's ZeRO-3 states ({head_states / MIB:.0f} MiB); % of the per-GPU lower bound in the run's dtype")
    print(f"  RDD FLOPs uncapped ({B * nt}+{B * nv} tokens): new {100 * out['rdd_uncapped_flops_frac']['new']:.3f}%, "
          f"old {100 * out['rdd_uncapped_flops_frac']['old']:.3f}% of the step")
    return out


def main() -> None:
    if sys.argv[1:2] == ["--_train"]:
        c, fx, out, *nums = sys.argv[2:]
        return print(json.dumps(worker_train(c, fx, out, *map(int, nums))))
    if sys.argv[1:2] == ["--_gpu"]:
        c, out, attn, *nums = sys.argv[2:]
        return print(json.dumps(worker_gpu(c, out, attn, *map(int, nums))))
    if sys.argv[1:2] == ["--_term"]:
        return print(json.dumps(worker_term(*sys.argv[2:7], *map(int, sys.argv[7:]))))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~2 minute smoke run: fewer steps/repeats, batch 2 in B")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_overhead.json"))
    ap.add_argument("--skip", choices=["a", "b"], help="skip one part")
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="Part A's configs (default: %(default)s)")
    ap.add_argument("--b-runs", nargs="+", default=B_RUNS, help="Part B's measurements (default: %(default)s)")
    ap.add_argument("--b-reps", type=int, help="Part B's timed reps (default 3; --quick 1)")
    ap.add_argument("--gpu-1b", action="store_true", help="run Part C only (CUDA): rdd/pre/distill at a ~1B shape")
    args = ap.parse_args()
    args.a_hidden, args.a_layers, args.a_batch = 256, 8, 8
    args.a_steps, args.a_warmup, args.repeats = (5, 2, 1) if args.quick else (12, 2, 3)
    args.c_steps, args.c_warmup = (6, 2) if args.quick else (14, 4)
    args.b_batch, reps = (2, 1) if args.quick else (16, 3)
    args.b_reps = args.b_reps or reps
    bad = [r for r in args.b_runs if not (r in ("time:rdd", "time:pre") or (r.startswith("mem:") and len(r.split(":")) == 6))]
    if bad:
        ap.error(f"--b-runs {bad}: each is time:rdd, time:pre or mem:TERM:IMPL:INPUTS:DTYPE:CAP")
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
        if args.gpu_1b:
            res["part_c"] = part_c(args, tmp)
        elif args.skip != "a":
            res["part_a"] = part_a(args, tmp)
        if args.skip != "b" and not args.gpu_1b:
            res["part_b"] = part_b(args)
    info.update(wall_s=time.time() - t0, loadavg_end=os.getloadavg())
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwall {info['wall_s']:.0f} s; 1-min load average at start {info['loadavg_start'][0]:.2f}, at end "
          f"{info['loadavg_end'][0]:.2f} ({os.cpu_count()} CPUs; our runs alone load ~1 in A, ~2 in B: "
          f"more means other processes competed); JSON: {args.json}")


if __name__ == "__main__":
    main()
