"""Benchmark `vlm-preserve merge` on a generated >= 1B-parameter checkpoint pair (bf16 safetensors shards):
wall time and peak RSS of our merge, of a plain read of the same inputs, and of mergekit's task_arithmetic
merge of the same tensors; then checks mergekit's output equals ours (density 1.0, sparsify none).

    PYTHONPATH=plugin .venv/transformers/bin/python benchmarks/bench_merge.py --work /tmp/bench_merge \
        --mergekit /tmp/venvs/mergekit/bin/mergekit-yaml

Each measurement is a fresh subprocess; peak RSS is its ru_maxrss (os.wait4). Two conditions: page cache warm
(the inputs read once before timing: times compare CPU and memory work), and cold (every input file evicted
from the page cache with posix_fadvise(DONTNEED) just before the run: the disk is read, as in a first merge).
The "VLM" is the LLM plus noise in the plain Llama layout, so that mergekit (which needs an architecture it
knows) reads the same tensors; vision tensors would only be copied, by both tools alike.

--size 7b: the same at LLaVA-1.5-7B's LLM size (Llama-7B's shape, 6.74e9 parameters, bf16, ~5 GB shards, written
tensor by tensor), every run with a cold cache and ended by `sync` (its writes on disk): the unavoidable I/O (a
plain sequential copy of the VLM's shards to the output disk plus a plain read of the base LLM's), our merge and
mergekit, with peak anonymous RSS (RssAnon of /proc/PID/status, polled every 20 ms) beside ru_maxrss.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B's shape: 1.10e9 parameters
SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)  # Llama-7B / Vicuna-7B, LLaVA-1.5-7B's LLM: 6.74e9
SHARD_7B = 5 * 10 ** 9  # bytes per shard, as transformers' save_pretrained writes them
ALPHA = 0.3


def tensors(s):
    h, i, kv = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"] * s["num_key_value_heads"]
    yield "model.embed_tokens.weight", (s["vocab_size"], h)
    for l in range(s["num_hidden_layers"]):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (s["vocab_size"], h)


def generate(folder: Path, seed: int, base: Path | None = None, shard_bytes: int = 1 << 30) -> int:
    """A Llama checkpoint in bf16 shards; with `base`, base + noise (a fine-tuned model's weights)."""
    import torch
    from safetensors.torch import load_file, save_file
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    base_sd = {}
    if base:
        for f in sorted(base.glob("*.safetensors")):
            base_sd.update(load_file(str(f)))
    shards, cur, size, n_params = [], {}, 0, 0
    for name, shape in tensors(SHAPE):
        t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02)
        t = (base_sd[name].float() + 0.1 * t if base else t).to(torch.bfloat16)
        cur[name] = t
        size += t.numel() * 2
        n_params += t.numel()
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    shards.append(cur)
    index = {}
    for k, sd in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, str(folder / fname), metadata={"format": "pt"})
        index.update({n: fname for n in sd})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    cfg = dict(SHAPE, architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16",
               max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return n_params


def generate_pair(work: Path, shape: dict, shard_bytes: int) -> int:
    """The base LLM and the "VLM" (base + noise) side by side, streamed tensor by tensor into shards whose headers
    are fixed up front (the plugin's ShardWriter), so memory stays at a few tensors whatever the size."""
    import torch
    from vlm_preserve.offline.writing import ShardWriter, shard_names, write_index
    specs, cur, size = [[]], 0, 0
    for name, shp in tensors(shape):
        n = 2
        for d in shp:
            n *= d
        if cur + n > shard_bytes and specs[-1]:
            specs.append([])
            cur = 0
        specs[-1].append((name, "BF16", shp))
        cur, size = cur + n, size + n
    names = shard_names(len(specs))
    g = torch.Generator().manual_seed(0)
    for folder in (work / "llm", work / "vlm"):
        folder.mkdir(parents=True)
        write_index(folder, {f: [s[0] for s in spec] for f, spec in zip(names, specs)}, size)
        cfg = dict(shape, architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16",
                   max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for f, spec in zip(names, specs):
        w_llm, w_vlm = ShardWriter(work / "llm" / f, spec), ShardWriter(work / "vlm" / f, spec)
        for name, _, shp in spec:
            t = torch.randn(shp, generator=g).mul_(0.02)
            w_llm.write(name, t.to(torch.bfloat16))
            w_vlm.write(name, t.add_(torch.randn(shp, generator=g), alpha=0.002).to(torch.bfloat16))
        w_llm.close()
        w_vlm.close()
    return size // 2


def measure(cmd: list[str], env=None) -> dict:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"{cmd[:3]} failed ({status}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2)}


READ = """import sys
from safetensors import safe_open
for folder in sys.argv[1:]:
    import glob
    for f in sorted(glob.glob(folder + '/*.safetensors')):
        with safe_open(f, framework='pt') as h:
            for k in h.keys():
                h.get_tensor(k)
"""
RAW = """import sys, glob
buf = bytearray(1 << 24)
for folder in sys.argv[1:]:
    for f in sorted(glob.glob(folder + '/*.safetensors')):
        with open(f, 'rb', buffering=0) as h:
            while h.readinto(buf):
                pass
"""


def evict(*folders: Path) -> None:
    """Drop the folders' files from the page cache (no root needed, unlike /proc/sys/vm/drop_caches)."""
    os.sync()
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def equal_outputs(a: Path, b: Path) -> tuple[int, list[str]]:
    import torch
    from safetensors import safe_open
    def index(folder):
        return {k: f for f in folder.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}
    ia, ib = index(a), index(b)
    bad = sorted(set(ia) ^ set(ib))
    for k in sorted(set(ia) & set(ib)):
        x = safe_open(str(ia[k]), "pt").get_tensor(k)
        y = safe_open(str(ib[k]), "pt").get_tensor(k)
        if x.dtype != y.dtype or not torch.equal(x, y):
            bad.append(k)
    return len(ia), bad


def measure_synced(cmd: list[str]) -> dict:
    """Wall time of `cmd` followed by `sync` (its writes on disk), ru_maxrss, and the peak anonymous RSS (RssAnon:
    the process's own memory, without the file pages it maps), polled every 20 ms."""
    import threading
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def poll():
        while not done.is_set():
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        k = line.split(":")[0]
                        if k in peak:
                            peak[k] = max(peak[k], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            done.wait(0.02)
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    err = p.stderr.read().decode()
    _, status, ru = os.wait4(p.pid, 0)
    done.set()
    th.join()
    t_proc = time.perf_counter() - t
    os.sync()
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"{cmd[:3]} failed ({status}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "process_s": round(t_proc, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1), "peak_anon_rss_mib": round(peak["RssAnon"] / 2 ** 20, 1),
            "peak_file_rss_mib": round(peak["RssFile"] / 2 ** 20, 1)}


COPY = """import sys, glob, os
src, dst, other = sys.argv[1:4]
buf = memoryview(bytearray(1 << 24))
os.makedirs(dst)
for f in sorted(glob.glob(src + '/*')):  # the VLM's shards and side files: read and written, the output's bytes
    with open(f, 'rb', buffering=0) as i, open(os.path.join(dst, os.path.basename(f)), 'wb', buffering=0) as o:
        while n := i.readinto(buf):
            o.write(buf[:n])
for f in sorted(glob.glob(other + '/*.safetensors')):  # the base LLM's: read
    with open(f, 'rb', buffering=0) as i:
        while i.readinto(buf):
            pass
"""


def gflops() -> float:
    """fp32 1024^3 GEMM, best of the rounds in 1 s: the machine's speed."""
    import torch
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best, t_end = 0.0, time.perf_counter() + 1
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * 1024 ** 3 / (time.perf_counter() - t))
    return best / 1e9


def main_7b(args) -> None:
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    llm, vlm, py = work / "llm", work / "vlm", sys.executable
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cpus": os.cpu_count(),
           "gemm_fp32_gflops": round(gflops(), 1), "loadavg_start": os.getloadavg(), "alpha": ALPHA,
           "shape": SHAPE_7B, "shard_bytes": SHARD_7B}
    with open("/proc/meminfo") as f:
        res["mem_total_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    dev = subprocess.run(["findmnt", "-no", "SOURCE", "--target", str(work.parent)], capture_output=True, text=True)
    res["disk"] = dev.stdout.strip()
    t = time.perf_counter()
    # in a child, so that the runs' ru_maxrss (which starts from the parent's RSS at fork) stays theirs
    subprocess.run([py, __file__, "--size", "7b", "--generate", str(work), "--layers",
                    str(SHAPE_7B["num_hidden_layers"])], check=True)
    res["parameters"] = json.loads((work / "n_params.json").read_text())
    os.sync()
    res["generate_s"] = round(time.perf_counter() - t, 1)
    res["input_bytes"] = sum(f.stat().st_size for f in work.rglob("*.safetensors"))
    res["shards_each"] = len(list(vlm.glob("*.safetensors")))
    print(json.dumps(res), flush=True)
    runs = [("io_copy", [py, "-c", COPY, str(vlm), str(work / "copy"), str(llm)]),
            ("ours", [py, "-c", "from vlm_preserve.cli import entry; entry()", "merge", "--vlm", str(vlm),
                      "--base-llm", str(llm), "--alpha", str(ALPHA), "--no-progress", "--out", str(work / "ours")])]
    if args.mergekit:
        cfg = work / "mergekit.yml"
        cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {vlm}\nmodels:\n  - model: {llm}\n"
                       f"    parameters:\n      weight: {ALPHA}\nparameters:\n  normalize: false\n"
                       f"dtype: float32\nout_dtype: bfloat16\n")
        runs.append(("mergekit", [args.mergekit, str(cfg), str(work / "mergekit"), "--lazy-unpickle",
                                  "--no-copy-tokenizer"]))
    for rep in range(args.reps):
        for name, cmd in (runs if rep % 2 == 0 else runs[::-1]):
            for out in ("copy", "ours", "mergekit"):  # one output on disk at a time, besides the inputs
                shutil.rmtree(work / out, ignore_errors=True)
            os.sync()
            evict(vlm, llm)
            r = measure_synced(cmd)
            res.setdefault(name, []).append(r)
            print(name, rep, r, flush=True)
            if name == "ours" and rep == 0 and args.mergekit:
                os.rename(work / "ours", work / "ours_kept")  # compared with mergekit's first output
            if name == "mergekit" and rep == 0:  # (before the next run removes it)
                count, bad = equal_outputs(work / "ours_kept", work / "mergekit")
                res["mergekit_equal"] = {"tensors": count, "different_or_missing": bad[:10], "n_different": len(bad)}
                print("mergekit_equal", res["mergekit_equal"], flush=True)
    recipe = json.loads(((work / "ours_kept") if args.mergekit else (work / "ours")).joinpath(
        "vlm_preserve_merge.json").read_text())
    first = sorted(vlm.glob("*.safetensors"))[0].name
    res["recipe_sha256_first_shard_ok"] = recipe["vlm"]["sha256"][first] == _sha256_file(vlm / first)
    best = {k: min(r["wall_s"] for r in res[k]) for k, _ in runs}
    res["ratios_best_wall"] = {k: round(v / best["io_copy"], 3) for k, v in best.items()}
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(work)


def _sha256_file(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 24):
            h.update(b)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/bench_merge", help="scratch folder (about 11 GB; removed at the end)")
    ap.add_argument("--mergekit", help="path of mergekit-yaml (in its own venv)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help="fewer layers, for a smoke run")
    ap.add_argument("--size", choices=["1b", "7b"], default="1b", help="7b: Llama-7B's shape, cold runs (see above)")
    ap.add_argument("--reps", type=int, default=1, help="7b: repetitions of each cold run (alternating order)")
    ap.add_argument("--json", help="7b: write the results here")
    args = ap.parse_args()
    if args.size == "7b":
        if args.layers:
            SHAPE_7B["num_hidden_layers"] = args.layers
        if args.generate:
            n = generate_pair(Path(args.generate), SHAPE_7B, SHARD_7B)
            return (Path(args.generate) / "n_params.json").write_text(str(n))
        return main_7b(args)
    SHAPE["num_hidden_layers"] = args.layers or SHAPE["num_hidden_layers"]
    if args.generate:
        work = Path(args.generate)
        n = generate(work / "llm", 0)
        generate(work / "vlm", 1, base=work / "llm")
        (work / "n_params.json").write_text(str(n))
        return
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    llm, vlm = work / "llm", work / "vlm"
    py = sys.executable
    t = time.perf_counter()
    # In a child: ru_maxrss of a later child would otherwise start from this process's size at fork.
    subprocess.run([py, __file__, "--generate", str(work), "--layers", str(SHAPE["num_hidden_layers"])], check=True)
    n = json.loads((work / "n_params.json").read_text())
    print(f"generated 2 checkpoints of {n / 1e9:.3f}B parameters in {time.perf_counter() - t:.0f} s", flush=True)
    subprocess.run(["sync"])
    res = {"loadavg_start": os.getloadavg(), "parameters": n, "alpha": ALPHA, "input_bytes": sum(f.stat().st_size for f in work.rglob("*.safetensors"))}
    measure([py, "-c", RAW, str(vlm), str(llm)])  # warm the page cache
    res["raw_read"] = measure([py, "-c", RAW, str(vlm), str(llm)])
    res["safetensors_read"] = measure([py, "-c", READ, str(vlm), str(llm)])
    print(res, flush=True)
    ours = [py, "-c", "from vlm_preserve.cli import entry; entry()", "merge", "--vlm", str(vlm), "--base-llm", str(llm),
            "--alpha", str(ALPHA), "--no-progress"]
    res["ours"] = measure(ours + ["--out", str(work / "ours")])
    res["plugin_import_only"] = measure([py, "-c", "import vlm_preserve.offline.merge, torch"])
    # the recipe's sha256 of both inputs alone (the merge runs it on a thread beside the arithmetic)
    res["sha256_only"] = measure([py, "-c", "import sys; from vlm_preserve.offline.writing import Hasher; "
                                  "Hasher(*sys.argv[1:]).hashes()", str(vlm), str(llm)])
    print(res["ours"], flush=True)
    shutil.rmtree(work / "ours_cold", ignore_errors=True)
    for name, cmd in (("raw_read_cold", [py, "-c", RAW, str(vlm), str(llm)]),
                      ("ours_cold", ours + ["--out", str(work / "ours_cold")])):
        evict(vlm, llm)
        res[name] = measure(cmd)
        print(name, res[name], flush=True)
    shutil.rmtree(work / "ours_cold")
    measure([py, "-c", RAW, str(vlm), str(llm)])  # warm again for the rows below
    res["ours_3_alphas"] = measure(ours[:-3] + ["--alpha", "0.1,0.2,0.4", "--no-progress", "--out", str(work / "ours3")])
    print(res["ours_3_alphas"], flush=True)
    shutil.rmtree(work / "ours3")
    if args.mergekit:
        cfg = work / "mergekit.yml"
        # task_arithmetic: base + sum_i w_i (theta_i - base), normalize off: = theta_vlm + alpha (theta_llm - theta_vlm)
        cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {vlm}\nmodels:\n  - model: {llm}\n"
                       f"    parameters:\n      weight: {ALPHA}\nparameters:\n  normalize: false\n"
                       f"dtype: float32\nout_dtype: bfloat16\n")
        res["mergekit"] = measure([args.mergekit, str(cfg), str(work / "mergekit"), "--lazy-unpickle",
                                   "--no-copy-tokenizer"])
        print(res["mergekit"], flush=True)
        count, bad = equal_outputs(work / "ours", work / "mergekit")
        res["mergekit_equal"] = {"tensors": count, "different_or_missing": bad[:10], "n_different": len(bad)}
    r = res["raw_read"]["wall_s"]
    res["ratios"] = {k: round(res[k]["wall_s"] / r, 2) for k in ("safetensors_read", "ours", "ours_3_alphas", "mergekit")
                     if k in res}
    res["ours_vs_safetensors_read"] = round(res["ours"]["wall_s"] / res["safetensors_read"]["wall_s"], 2)
    res["cold_ratio_ours_vs_raw_read"] = round(res["ours_cold"]["wall_s"] / res["raw_read_cold"]["wall_s"], 2)
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
