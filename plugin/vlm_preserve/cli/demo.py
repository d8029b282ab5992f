"""The main command until the real reproduction exists: upstream LLaVA `train()` with `--regularizer rdd,pre`
on a tiny random model built offline, then where each term was logged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def demo(out: str, regularizer: str = "rdd,pre", max_steps: int = 8) -> int:
    import torch

    from ..fixtures import build_tiny_llava
    from .llava_train import main as llava_train

    out_dir = Path(out).resolve()
    fixture_dir, run_dir = out_dir / "fixture", out_dir / "run"
    for d in (fixture_dir, run_dir):
        if d.exists():
            shutil.rmtree(d)
    print(f"[demo] building a tiny random LLaVA (Llama + CLIP) and a generated dataset in {fixture_dir}")
    fx = build_tiny_llava(fixture_dir)
    argv = fx.train_args(run_dir, max_steps=max_steps) + ["--regularizer", regularizer]
    print("[demo] llava-train " + " ".join(argv))
    torch.manual_seed(0)
    llava_train(argv)
    state = json.loads((run_dir / "trainer_state.json").read_text())
    terms = sorted({k for row in state["log_history"] for k in row if k.endswith("_loss") and k != "train_loss"})
    print(f"\n[demo] logged per step in {run_dir / 'trainer_state.json'} (log_history), and to any "
          "--report_to backend (wandb/tensorboard) under the same names:")
    for row in state["log_history"]:
        if "loss" in row:
            print("  step {:>3}  loss {:.4f}  ".format(row["step"], row["loss"])
                  + "  ".join(f"{k} {row[k]:.4f}" for k in terms if k in row))
    print(f"[demo] exported model (no training-only heads): {run_dir}")
    return 0
