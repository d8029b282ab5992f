"""Each method at its best, per regime, chosen on validation items only.

GRID lists, per method, the settings tried: the first is the paper's (or the plugin's) default, the others log-spaced
around it (a factor of 10, or of about 3 for a fraction), plus the ablations the papers name. Every setting is one
Full-Tuning-length run at the regime (study/sweep.py's REGIMES), seed 0, scored on the validation items only (chat
replies, prose documents, easy-vqa questions on held-out training images); each is one json in the regime's folder,
and a rerun skips what exists. Full-Tuning itself is run the same way in the same folder: the reference.

The rule (written 2026-12-06, committed before any selection run was evaluated):
- admitted: validation easy-vqa accuracy at least Full-Tuning's − VQA_MARGIN (0.02);
- score: validation language recovery, the mean of the chat-reply and the plain-text recovery, each
  (full − method) / (full − base) on the mean per-item NLL; equal weights, because each is already a share of
  Full-Tuning's own loss on its metric, so neither dominates by its scale in nats;
- chosen: the admitted setting with the highest score; a tie goes to the earlier setting in GRID (the default
  first). Where no setting is admitted the default is kept and the row says so.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .evaluate import mean, paired_bootstrap

VQA_MARGIN = 0.02

GRID = {
    "full": [{}],
    "rdd_rbf": [{"rdd_weight": 1.0}, {"rdd_weight": 0.1}, {"rdd_weight": 10.0},
                {"rdd_bandwidth_scale": 0.5}, {"rdd_bandwidth_scale": 2.0}],
    "pre": [{"pre_weight": 0.5}, {"pre_weight": 0.05}, {"pre_weight": 5.0}, {"pre_layer": "7"}],
    "distill": [{"distill_weight": 1.0}, {"distill_weight": 0.1}, {"distill_weight": 10.0},
                {"distill_route": "all"}, {"distill_route": "text_only"}],
    "mix": [{"mix_fraction": 0.2}, {"mix_fraction": 0.07}, {"mix_fraction": 0.5}],
    "soft_label": [{"soft_label_alpha": 0.1}, {"soft_label_alpha": 0.03}, {"soft_label_alpha": 0.3}],
    "lora": [{"lora_rank": 16}, {"lora_rank": 4}, {"lora_rank": 64}],
    "attention_tuning": [{}],
    "rdd_linear": [{}],
    "rdd_l2": [{}],
    "dft": [{}],
}


def tag(method: str, setting: dict) -> str:
    return method + "".join(f"__{k}={v:g}" if isinstance(v, float) else f"__{k}={v}" for k, v in setting.items())


def plan(methods=None) -> list[tuple[str, dict]]:
    """The order runs are done in: Full-Tuning, then each of the namesake methods' weights, then the rest, so a
    session cut short has the reference and the papers' own knobs first."""
    methods = list(methods or GRID)
    first = [(m, s) for m in ("full", "rdd_rbf", "pre", "distill") if m in methods for s in GRID[m][:3]]
    rest = [(m, s) for m in methods for s in GRID[m] if (m, s) not in first]
    return first + rest


def _write(path: Path, rec: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)


def run(study, out: Path, regime: str, methods=None, seed: int = 0) -> list[str]:
    """Every setting of `plan(methods)` not yet in `out`; returns those done now."""
    from .model import build_vlm
    from .machine import cpu_gflops
    from .sweep import REGIMES
    import torch
    out.mkdir(parents=True, exist_ok=True)
    r, done = REGIMES[regime], []
    if not (out / "base.json").exists():
        llm = study.load_llm()
        vlm = build_vlm(llm, study.image_token_id(llm), seed=seed)
        vlm.projector.load_state_dict(torch.load(study.stage1(seed)))
        t0 = time.time()
        _write(out / "base.json", {"method": "base", "setting": {}, "items": study.validation_eval(vlm),
                                   "eval_s": round(time.time() - t0, 1), "cpu_gflops": cpu_gflops()})
        done.append("base")
    for method, setting in plan(methods):
        name = tag(method, setting)
        if (out / f"{name}.json").exists():
            continue
        vlm, history, wall = study.stage2(method, seed, steps=r["steps"], lr=r["lr"], schedule=r["schedule_steps"],
                                          setting=setting, run=f"select_{regime}_{name}")
        t0 = time.time()
        items = study.validation_eval(vlm)
        _write(out / f"{name}.json", {"method": method, "setting": setting, "regime": regime, **r, "seed": seed,
                                      "items": items, "train_log": [x for x in history if "loss" in x],
                                      "train_s": round(wall, 1), "eval_s": round(time.time() - t0, 1),
                                      "cpu_gflops": cpu_gflops(), "torch_threads": torch.get_num_threads()})
        shutil.rmtree(study.out / "ckpt" / f"select_{regime}_{name}", ignore_errors=True)
        print(f"[select] {regime}: {name} stored ({wall:.0f} s training, {time.time() - t0:.0f} s evaluating)",
              flush=True)
        done.append(name)
    return done


def load(d: Path) -> tuple[dict, list[dict]]:
    d = Path(d)
    if not (d / "base.json").exists():
        raise ValueError(f"no selection runs in {d}: run `vlm-preserve study --select --regime ...` first")
    base = json.loads((d / "base.json").read_text())
    order = {tag(m, s): i for i, (m, s) in enumerate((m, s) for m in GRID for s in GRID[m])}
    recs = [json.loads(p.read_text()) for p in d.glob("*.json") if p.name != "base.json"]
    return base, sorted(recs, key=lambda r: order.get(tag(r["method"], r["setting"]), 10 ** 6))


def _nll(rec: dict, part: str) -> list[float]:
    return [x["nll"] for x in rec["items"][part]]


def summarize(base: dict, recs: list[dict]) -> list[dict]:
    """Per setting: Δ from the base LLM (CIs), recovery against the folder's Full-Tuning run, easy-vqa, admitted."""
    full = next((r for r in recs if r["method"] == "full"), None)
    rows = []
    for r in recs:
        row = {"method": r["method"], "setting": r["setting"], "tag": tag(r["method"], r["setting"]),
               "vqa": mean(x["acc"] for x in r["items"]["vqa"])}
        for part in ("chat", "text"):
            row[f"d_{part}"] = paired_bootstrap(_nll(r, part), _nll(base, part))
            if full is not None:
                f, b, m = (mean(_nll(x, part)) for x in (full, base, r))
                row[f"rec_{part}"] = (f - m) / (f - b) if f != b else float("nan")
        if full is not None:
            row["full_vqa"] = mean(x["acc"] for x in full["items"]["vqa"])
            row["score"] = (row["rec_chat"] + row["rec_text"]) / 2
            row["admitted"] = row["vqa"] >= row["full_vqa"] - VQA_MARGIN
        rows.append(row)
    return rows


def choose(rows: list[dict]) -> dict:
    """{method: the chosen row} by the rule above (rows in GRID order; the default where none is admitted)."""
    out = {}
    for r in rows:
        if r["method"] == "full" or "admitted" not in r:
            continue
        best = out.get(r["method"])
        if best is None or (r["admitted"] and (not best["admitted"] or r["score"] > best["score"])):
            out[r["method"]] = r
    return out


def chosen_settings(d: Path) -> dict:
    """{method: setting} chosen from the jsons in `d` (what the table's runs use)."""
    return {m: r["setting"] for m, r in choose(summarize(*load(d))).items()}


def markdown(rows: list[dict], regime: str) -> str:
    chosen = {id(r) for r in choose(rows).values()}
    out = [f"**{regime}** regime. Δ: validation NLL minus the base LLM's (95% paired bootstrap CI); recovery: share of "
           "Full-Tuning's validation loss avoided; score: mean of the two recoveries; admitted: validation easy-vqa "
           f"within {VQA_MARGIN} of Full-Tuning's.", "",
           "| method | setting | Δ chat NLL | Δ text NLL | chat recovery | text recovery | score | easy-vqa (val) | "
           "admitted |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, t = r["d_chat"], r["d_text"]
        setting = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["setting"].items())
        rec = (f"{r['rec_chat']:+.0%} | {r['rec_text']:+.0%} | {r['score']:+.0%}" if "score" in r and
               r["method"] != "full" else "— | — | —")
        adm = "—" if r["method"] == "full" or "admitted" not in r else ("yes" if r["admitted"] else "no")
        out.append(f"| {r['method']} | {setting or 'default'}{' **chosen**' if id(r) in chosen else ''} | "
                   f"{c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}] | {t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}] | {rec} | "
                   f"{r['vqa']:.3f} | {adm} |")
    done = {r["tag"] for r in rows}
    missing = [tag(m, s) for m in GRID for s in GRID[m] if tag(m, s) not in done]
    if missing:
        out += ["", f"Not yet run ({len(missing)}): " + ", ".join(f"`{t}`" for t in missing) + "."]
    return "\n".join(out) + "\n"


def report(d: Path, md: Path, regime: str) -> dict:
    """The selection table of `d` into `md`'s generated block `select-<regime>`; returns {method: setting}."""
    from .report import fill
    rows = summarize(*load(d))
    fill(md, f"select-{regime}", markdown(rows, regime))
    return {m: r["setting"] for m, r in choose(rows).items()}
