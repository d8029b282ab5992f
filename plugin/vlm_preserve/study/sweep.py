"""The regime sweep: where does Full-Tuning measurably forget? Chosen on validation items only.

One Full-Tuning run per learning rate (cosine schedule over the longest step count), evaluated at several steps
along the run on the validation items (chat response NLL, plain-text NLL, easy-vqa on held-out training images),
never on report items. Each (lr, step) is one json in `<out>/sweep/`; a rerun skips what exists (an lr whose
steps are all stored is not retrained). `choose()` applies the rule below to those files; the chosen setting is
then frozen as the study's default before any report number of any method is computed.

The rule (issue: "the smallest setting where Full-Tuning's degradation on the primary validation metric has a CI
excluding zero, easy-vqa has plateaued, and training has not diverged"):
- primary metric: chat response NLL (mean token NLL of the reference reply), paired with the base LLM per item;
  degraded = the lower end of the bootstrap 95% CI of (tuned − base) is above 0;
- plateaued: validation easy-vqa accuracy at that step is within PLATEAU of the best over that run's steps;
- not diverged: every logged training loss is finite and the last one logged is below the first;
- smallest: the least lr × steps (the drift), then the smaller lr.

The strong regime (`choose_strong`; written 2026-12-05, before any run on the new data was evaluated): the same rule
with "degraded" sharpened to a validation chat-reply NLL rise of at least STRONG nats (point estimate; its CI's
lower end above 0 as well) — where forgetting is large enough that a method's recovery is measured against a clear
loss, not against noise.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from .evaluate import mean, paired_bootstrap

LRS = (1e-4, 3e-4, 1e-3)
STEPS = (25, 50, 100, 150)
PLATEAU = 0.03
STRONG = 1.0
# What the rules chose on the pilot (docs/results-pilot.md, validation items, seed 0), frozen before any method ran:
# `steps` trained of a cosine schedule `schedule_steps` long. StudyConfig's defaults are the mild one.
REGIMES = {"mild": {"lr": 1e-4, "steps": 30, "schedule_steps": 100},
           "strong": {"lr": 3e-4, "steps": 100, "schedule_steps": 100}}


def _name(lr: float, step: int) -> str:
    return f"lr{lr:g}_step{step}"


def _write(path: Path, rec: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)


def run(study, out: Path, lrs=LRS, steps=STEPS, seed: int = 0) -> list[str]:
    """Every (lr, step) not yet in `out`; returns those done now."""
    from transformers import TrainerCallback

    from .machine import cpu_gflops
    out.mkdir(parents=True, exist_ok=True)
    done = []
    if not (out / "base.json").exists():
        from .model import build_vlm
        llm = study.load_llm()
        vlm = build_vlm(llm, study.image_token_id(llm), seed=seed)
        import torch
        vlm.projector.load_state_dict(torch.load(study.stage1(seed)))
        t0 = time.time()
        items = study.validation_eval(vlm)   # step 0: the LLM is still the base LLM (stage 1 froze it)
        _write(out / "base.json", {"lr": 0, "step": 0, "items": items, "eval_s": round(time.time() - t0, 1),
                                   "cpu_gflops": cpu_gflops()})
        done.append("base")
    for lr in lrs:
        todo = [s for s in steps if not (out / f"{_name(lr, s)}.json").exists()]
        if not todo:
            continue

        class Probe(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step not in todo:
                    return
                t0 = time.time()
                items = study.validation_eval(model)
                model.train()
                log = [r for r in state.log_history if "loss" in r]
                _write(out / f"{_name(lr, state.global_step)}.json",
                       {"lr": lr, "step": state.global_step, "max_steps": max(steps), "seed": seed, "items": items,
                        "train_log": log, "eval_s": round(time.time() - t0, 1), "cpu_gflops": cpu_gflops()})
                done.append(_name(lr, state.global_step))
                print(f"[sweep] lr {lr:g} step {state.global_step}: stored ({time.time() - t0:.0f} s to evaluate)",
                      flush=True)
        study.stage2("full", seed, steps=max(steps), lr=lr, schedule=max(steps), callbacks=[Probe()],
                     run=f"sweep_lr{lr:g}")
        shutil.rmtree(study.out / "ckpt" / f"sweep_lr{lr:g}", ignore_errors=True)
    return done


def load(d: Path) -> tuple[dict, list[dict]]:
    d = Path(d)
    if not (d / "base.json").exists():
        raise ValueError(f"no sweep in {d}: run `vlm-preserve study --sweep` first")
    base = json.loads((d / "base.json").read_text())
    recs = [json.loads(p.read_text()) for p in sorted(d.glob("lr*_step*.json"))]
    return base, sorted(recs, key=lambda r: (r["lr"], r["step"]))


def summarize(base: dict, recs: list[dict]) -> list[dict]:
    """Per (lr, step): paired differences from the base LLM with bootstrap CIs, easy-vqa, the plateau and
    divergence checks, and whether the rule admits it."""
    best_vqa = {}
    for r in recs:
        best_vqa[r["lr"]] = max(best_vqa.get(r["lr"], 0.0), mean(x["acc"] for x in r["items"]["vqa"]))
    rows = []
    for r in recs:
        it, b = r["items"], base["items"]
        chat = paired_bootstrap([x["nll"] for x in it["chat"]], [x["nll"] for x in b["chat"]])
        text = paired_bootstrap([x["nll"] for x in it["text"]], [x["nll"] for x in b["text"]])
        vqa = mean(x["acc"] for x in it["vqa"])
        losses = [x["loss"] for x in r["train_log"]]
        row = {"lr": r["lr"], "step": r["step"], "drift": r["lr"] * r["step"], "d_chat_nll": chat,
               "d_text_nll": text, "p_end1": mean(x["p_end1"] for x in it["chat"]),
               "base_p_end1": mean(x["p_end1"] for x in b["chat"]), "vqa_acc": vqa,
               "base_vqa_acc": mean(x["acc"] for x in b["vqa"]), "train_loss": losses[-1] if losses else float("nan"),
               "degraded": chat[1] > 0, "plateaued": vqa >= best_vqa[r["lr"]] - PLATEAU,
               "diverged": not losses or not all(math.isfinite(x) for x in losses) or losses[-1] >= losses[0]}
        row["admitted"] = row["degraded"] and row["plateaued"] and not row["diverged"]
        for part in ("chat", "text"):
            d = [x["nll"] - y["nll"] for x, y in zip(it[part], b[part])]
            row[f"sd_{part}"] = _sd(d)
            row[f"n_{part}"] = _items_for(row[f"sd_{part}"], row[f"d_{part}_nll"][0])
        rows.append(row)
    return rows


def _sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5


def _items_for(sd: float, delta: float) -> int:
    """Items for a 95% CI half-width of a quarter of `delta` (paired, per-item sd `sd`): (1.96·sd / (Δ/4))²."""
    return math.ceil((1.96 * sd / (abs(delta) / 4)) ** 2) if delta else 0


def choose(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["admitted"]]
    return min(ok, key=lambda r: (r["drift"], r["lr"])) if ok else None


def choose_strong(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["admitted"] and r["d_chat_nll"][0] >= STRONG]
    return min(ok, key=lambda r: (r["drift"], r["lr"])) if ok else None


def markdown(rows: list[dict], chosen: dict | None, strong: dict | None = None) -> str:
    out = ["| lr | step | Δ chat NLL (95% CI) | Δ text NLL (95% CI) | p(end after 1st token) | easy-vqa (val) | "
           "train loss | degraded | plateaued | diverged | per-item sd of Δ (chat / text) | items for ±Δ/4 "
           "(chat / text) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, t = r["d_chat_nll"], r["d_text_nll"]
        mark = (" **chosen**" if chosen is r else "") + (" **strong**" if strong is r else "")
        out.append(f"| {r['lr']:g} | {r['step']}{mark} | {c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}] | "
                   f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}] | {r['p_end1']:.3g} (base {r['base_p_end1']:.2g}) | "
                   f"{r['vqa_acc']:.3f} (stage 1: {r['base_vqa_acc']:.3f}) | {r['train_loss']:.3f} | "
                   f"{'yes' if r['degraded'] else 'no'} | {'yes' if r['plateaued'] else 'no'} | "
                   f"{'yes' if r['diverged'] else 'no'} | {r['sd_chat']:.3f} / {r['sd_text']:.3f} | "
                   f"{r['n_chat']} / {r['n_text']} |")
    return "\n".join(out) + "\n"


def report(d: Path, md: Path) -> dict | None:
    """The sweep's table into `md`'s generated block `sweep` (the whole file where it has none); returns the
    chosen row."""
    from .report import fill
    rows = summarize(*load(d))
    chosen, strong = choose(rows), choose_strong(rows)
    fill(md, "sweep", markdown(rows, chosen, strong))
    print("[sweep] strong regime: " + (f"lr {strong['lr']:g}, {strong['step']} steps" if strong else
                                       f"none (no admitted setting lost >= {STRONG:g} nat of chat-reply NLL)"))
    return chosen
