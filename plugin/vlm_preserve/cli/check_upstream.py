"""`vlm-preserve check-upstream NAME`: does the installed (or a checked-out) upstream still have every
symbol the plugin touches, as declared in upstream_symbols/NAME/symbols.json? Then one tiny patched step."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def declarations(upstream: str) -> dict:
    local = Path(__file__).resolve().parents[3] / "upstream_symbols" / upstream / "symbols.json"  # source checkout
    if local.exists():
        return json.loads(local.read_text())
    from importlib.resources import files
    return json.loads((files("vlm_preserve.upstream_symbols") / upstream / "symbols.json").read_text())


def _resolve(name: str):
    module, _, attr = name.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check_symbol(decl: dict) -> str | None:
    """None if the symbol matches its declaration, else what is wrong."""
    try:
        obj = _resolve(decl["name"])
    except (ImportError, AttributeError) as e:
        return f"missing ({type(e).__name__}: {e})"
    if "value" in decl and obj != decl["value"]:
        return f"value {obj!r}, expected {decl['value']!r}"
    if "params" in decl or "params_include" in decl:
        found = list(inspect.signature(obj).parameters)
        if "params" in decl and found != decl["params"]:
            return f"parameters {found}, expected {decl['params']}"
        lacking = [p for p in decl.get("params_include", []) if p not in found]
        if lacking:
            return f"parameters {found} lack {lacking}"
    if "attrs_include" in decl:
        lacking = [a for a in decl["attrs_include"] if not hasattr(obj(), a)]
        if lacking:
            return f"instances lack attributes {lacking}"
    if decl.get("fields_include"):
        names = {f.name for f in dataclasses.fields(obj)}
        lacking = [f for f in decl["fields_include"] if f not in names]
        if lacking:
            return f"dataclass fields lack {lacking}"
    return None


def _versions(decl: dict) -> dict:
    out = {}
    for dist in decl["targets"]:
        if dist == "upstream_commit":
            continue
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _tiny_run_transformers() -> str | None:
    import torch
    import transformers as T

    from .. import attach
    text = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    vision = T.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                image_size=16, patch_size=8)
    model = T.LlavaForConditionalGeneration(T.LlavaConfig(text_config=text, vision_config=vision, image_token_id=63))
    ids = torch.tensor([[63] * 4 + list(range(5, 15))])
    att = attach(model, "rdd,pre")
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16), labels=ids.masked_fill(ids == 63, -100),
                **att.forward_kwargs())
    loss, logs = att.total_loss(out.loss, out)
    loss.backward()
    att.detach()
    bad = [k for k, v in logs.items() if v is None or not torch.isfinite(v)]
    return f"tiny attached step gave no finite {bad}" if bad else None


def _first_step_finite(rows: list[dict], what: str) -> str | None:
    """None if the first logged training step has a finite loss, rdd_loss and pre_loss, else what is wrong."""
    row = next((r for r in rows if "loss" in r), {})
    bad = [k for k in ("loss", "rdd_loss", "pre_loss") if not (k in row and row[k] == row[k] and abs(row[k]) < 1e6)]
    return f"tiny {what} step logged no finite {bad}: {row}" if bad else None


def _tiny_run_llamafactory() -> str | None:
    import yaml

    from ..testing.hf_vlm import build_tiny_hf_vlm
    from .llamafactory_train import main as train
    with tempfile.TemporaryDirectory() as tmp:
        fx = build_tiny_hf_vlm(Path(tmp) / "fx", "qwen2_vl", n_image=4, n_text=2)
        out = Path(tmp) / "run"
        cfg = dict(model_name_or_path=str(fx.model), stage="sft", do_train=True, finetuning_type="full",
                   dataset="tiny_mm", dataset_dir=str(fx.write_llamafactory()), template="qwen2_vl", cutoff_len=256,
                   output_dir=str(out), max_steps=1, per_device_train_batch_size=2, logging_steps=1,
                   save_strategy="no", report_to="none", bf16=False, image_max_pixels=1024, plot_loss=False)
        (Path(tmp) / "run.yaml").write_text(yaml.safe_dump(cfg))
        train([str(Path(tmp) / "run.yaml"), "--regularizer", "rdd,pre"])
        rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        return _first_step_finite(rows, "llamafactory-train")


def _tiny_run_swift() -> str | None:
    from ..testing.hf_vlm import build_tiny_hf_vlm
    from ..frameworks.swift import ENV, plugin_path
    with tempfile.TemporaryDirectory() as tmp:
        fx = build_tiny_hf_vlm(Path(tmp) / "fx", "qwen2_vl", n_image=4, n_text=2, qwen_ids=True)
        out = Path(tmp) / "run"
        cmd = [str(Path(sys.executable).parent / "swift"), "sft", "--model", str(fx.model), "--model_type", "qwen2_vl",
               "--template", "qwen2_vl", "--dataset", str(fx.write_swift()), "--output_dir", str(out),
               "--add_version", "false", "--check_model", "false", "--report_to", "none", "--torch_dtype", "float32",
               "--tuner_type", "full", "--max_steps", "1", "--per_device_train_batch_size", "4", "--logging_steps", "1",
               "--save_strategy", "no", "--split_dataset_ratio", "0", "--dataloader_num_workers", "0",
               "--dataloader_persistent_workers", "false", "--max_pixels", "1024", "--external_plugins", plugin_path()]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **{ENV: "--regularizer rdd,pre"}))
        if p.returncode != 0:
            return f"tiny swift sft step failed ({p.returncode}): {p.stderr[-2000:]}"
        rows = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
        return _first_step_finite(rows, "swift sft")


def _tiny_run(upstream: str = "llava") -> str | None:
    if upstream == "transformers":
        return _tiny_run_transformers()
    if upstream == "llamafactory":
        return _tiny_run_llamafactory()
    if upstream == "swift":
        return _tiny_run_swift()
    return _tiny_run_launcher(upstream)


def _scratch() -> tempfile.TemporaryDirectory:
    # LLaVA's train() loads any --model_name_or_path containing "mpt" as an MPT model, and a random name can spell it
    while "mpt" in Path((d := tempfile.TemporaryDirectory(prefix="vlm-preserve-check-")).name).name:
        d.cleanup()
    return d


def _tiny_run_launcher(upstream: str) -> str | None:
    import torch

    from ..testing import fixtures
    with _scratch() as tmp:
        if upstream == "nvila":
            from .nvila_train import main as train
            fx = fixtures.build_tiny_nvila(Path(tmp) / "fx", n_image_samples=4, n_text_samples=2)
            import llava.data.builder as registry  # read VILA_DATASETS at import, already done: add ours
            registry.DATASETS.update(registry.register_datasets(str(fx.registry)))
            args = fixtures.nvila_train_args(fx, Path(tmp) / "run", max_steps=1, per_device_train_batch_size=6)
            args += ["--cpu_compat", str(not torch.cuda.is_available())]
        elif upstream == "bunny":
            from .bunny_train import main as train
            fx = fixtures.build_tiny_bunny(Path(tmp) / "fx", "phi-2", n_image_samples=4, n_text_samples=2)
            args = fixtures.bunny_train_args(fx, Path(tmp) / "run", max_steps=1, per_device_train_batch_size=6)
        else:
            from .llava_train import main as train
            fx = fixtures.build_tiny_llava(Path(tmp) / "fx", n_image_samples=4, n_text_samples=2)
            args = fx.train_args(Path(tmp) / "run", max_steps=1, per_device_train_batch_size=6)
        torch.manual_seed(0)
        train(args + ["--regularizer", "rdd,pre"])
        hist = json.loads((Path(tmp) / "run" / "trainer_state.json").read_text())["log_history"]
        return _first_step_finite(hist, "patched")


def check_upstream(upstream: str, source: str | None = None, run: bool = True) -> int:
    if source:  # re-run in a fresh interpreter that imports the checkout first
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(source).resolve())] + sys.path))
        args = [sys.executable, "-c", "from vlm_preserve.cli import entry; entry()", "check-upstream", upstream]
        env["VLM_PRESERVE_CHECK_SOURCE"] = str(source)
        return subprocess.call(args + ([] if run else ["--skip-run"]), env=env)
    source = os.environ.get("VLM_PRESERVE_CHECK_SOURCE")
    decl = declarations(upstream)
    versions = _versions(decl)
    where = (f"source tree {source}" if source else "installed") + "; " + ", ".join(f"{k} {v}" for k, v in versions.items())
    problems = [(d["name"], err) for d in decl["symbols"] if (err := check_symbol(d))]
    for name, err in problems:
        print(f"DRIFT {name}: {err}  [{where}; plugin targets {decl['targets']}]", file=sys.stderr)
    if problems:
        print(f"check-upstream {upstream}: {len(problems)} of {len(decl['symbols'])} symbols drifted.", file=sys.stderr)
        return 1
    print(f"check-upstream {upstream}: all {len(decl['symbols'])} declared symbols match ({where}).")
    for dist, found in versions.items():
        if found != decl["targets"][dist]:
            print(f"note: tested against {dist} {decl['targets'][dist]}, found {found}: the symbols match, "
                  "behaviour beyond them is untested.")
    if run:
        err = _tiny_run(upstream)
        if err:
            print(f"DRIFT tiny run: {err} [{where}]", file=sys.stderr)
            return 1
        print(f"check-upstream {upstream}: one patched forward+backward with rdd,pre ran, terms finite.")
    return 0
