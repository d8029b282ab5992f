"""`vlm-preserve merge --alpha auto`: choose the merge's α (and density) on validation items.

Every point of the grid (α in `--auto-alphas` × `--density` values) is merged, scored and deleted again, one at a
time (at most two merged models on disk: the point scored and the best so far):

- language: the language monitor's metric (`lang_nll`: mean token NLL of the language model on `--texts`, the
  builtin set or your validation jsonl); recovery = (nll(VLM) − nll(point)) / (nll(VLM) − nll(base LLM)), the
  share of the language the VLM's tuning lost that the point gets back;
- VQA: your own evaluation on your validation questions, `--vqa-eval CMD` with `{model}` standing for the merged
  folder; the last line it prints is the score (higher is better, e.g. accuracy in [0, 1]). The VLM itself (α = 0)
  is scored by the same command.

The rule: a point is admitted when its VQA score is at least the VLM's − `--vqa-budget` (default 0.01); the chosen
point is the admitted one with the highest recovery (ties: the smaller α, then the larger density). Where no point
is admitted, or the VLM lost no language (nll(VLM) ≤ nll(base)), nothing is merged: α = 0, the VLM as it is.

Output folder `--out`: `model/` (the chosen merged VLM, with its `vlm_preserve_merge.json` recipe; absent when
α = 0 is chosen), `merge_auto.json` (the curve, the references and the choice) and `merge_auto.png` (VQA against
language recovery: every point, the Pareto front, the budget line, the choice). Written atomically: a killed run
leaves no `--out`.
"""
from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
from pathlib import Path

from ..config import ConfigError

AUTO_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def recovery(nll_vlm: float, nll_point: float, nll_base: float) -> float:
    return (nll_vlm - nll_point) / (nll_vlm - nll_base) if nll_vlm > nll_base else float("nan")


def choose(points: list[dict], vqa_ref: float, budget: float) -> dict | None:
    """The rule above over points {alpha, density, recovery, vqa}: the chosen point, or None (do not merge). Marks
    each point's `admitted`."""
    best = None
    for p in points:
        p["admitted"] = p["vqa"] >= vqa_ref - budget and not math.isnan(p["recovery"])
        if p["admitted"] and (best is None or (p["recovery"], -p["alpha"], p["density"]) >
                              (best["recovery"], -best["alpha"], best["density"])):
            best = p
    return best


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both VQA and recovery, by VQA descending."""
    pts = [p for p in points if not math.isnan(p["recovery"])]
    front = [p for p in pts if not any(q["vqa"] >= p["vqa"] and q["recovery"] >= p["recovery"] and
                                       (q["vqa"] > p["vqa"] or q["recovery"] > p["recovery"]) for q in pts)]
    return sorted(front, key=lambda p: -p["vqa"])


def plot(points: list[dict], vqa_ref: float, budget: float, chosen: dict | None, path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for d in sorted({p["density"] for p in points}):
        ps = sorted((p for p in points if p["density"] == d), key=lambda p: p["alpha"])
        ax.plot([p["vqa"] for p in ps], [p["recovery"] for p in ps], "o-", ms=4, lw=1, alpha=0.7,
                label=f"density {d:g}")
        for p in ps:
            ax.annotate(f"α={p['alpha']:g}", (p["vqa"], p["recovery"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front = pareto(points)
    if front:
        ax.plot([p["vqa"] for p in front], [p["recovery"] for p in front], "k--", lw=1, label="Pareto front")
    ax.plot([vqa_ref], [0.0], "rs", label="the VLM (α = 0)")
    ax.axvline(vqa_ref - budget, color="gray", ls=":", lw=1, label=f"VQA budget ({budget:g})")
    if chosen is not None:
        ax.plot([chosen["vqa"]], [chosen["recovery"]], "*", color="gold", mec="k", ms=14,
                label=f"chosen α={chosen['alpha']:g}, density {chosen['density']:g}")
    ax.set_xlabel("VQA score on validation (higher is better)")
    ax.set_ylabel("language recovery on validation")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def curve_text(points: list[dict], ref: dict, chosen: dict | None) -> str:
    lines = [f"[merge auto] VLM: lang_nll {ref['nll_vlm']:.4f}, VQA {ref['vqa_vlm']:.4f}; base LLM: lang_nll "
             f"{ref['nll_base']:.4f}; budget {ref['budget']:g} (admitted: VQA >= {ref['vqa_vlm'] - ref['budget']:.4f})",
             "| alpha | density | lang_nll | recovery | VQA | admitted |", "|---|---|---|---|---|---|"]
    for p in points:
        mark = " **chosen**" if p is chosen else ""
        lines.append(f"| {p['alpha']:g}{mark} | {p['density']:g} | {p['lang_nll']:.4f} | {p['recovery']:+.1%} | "
                     f"{p['vqa']:.4f} | {'yes' if p['admitted'] else 'no'} |")
    lines.append(f"[merge auto] chosen: α {chosen['alpha']:g}, density {chosen['density']:g}" if chosen else
                 "[merge auto] chosen: no merge (α = 0): " + ("the VLM lost no language on these texts"
                                                               if math.isnan(points[0]["recovery"]) else
                                                               "no point keeps VQA within the budget"))
    return "\n".join(lines)


def vqa_score(command: str, model: Path) -> float:
    """Run the user's evaluation on `model`; the last line of its output is the score."""
    argv = [tok.replace("{model}", str(model)) for tok in shlex.split(command)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True)
    except OSError as e:
        raise ConfigError(f"--vqa-eval: could not run {argv[0]!r} ({e}); give a command, e.g. "
                          "\"python eval_vqa.py --model {model}\"") from None
    lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
    if p.returncode != 0:
        raise ConfigError(f"--vqa-eval on {model} exited with {p.returncode}: {p.stderr.strip()[-1500:]}")
    try:
        return float(lines[-1])
    except (IndexError, ValueError):
        raise ConfigError(f"--vqa-eval on {model}: its last output line should be the score (a number), got "
                          f"{lines[-1]!r}" if lines else f"--vqa-eval on {model} printed nothing; it must print the "
                          "score (a number) as its last line") from None


def merge_auto(vlm: str, base_llm: str, out: str, *, vqa_eval: str, alphas=AUTO_ALPHAS, densities=(1.0,),
               sparsify_method: str = "none", seed: int = 0, vqa_budget: float = 0.01, texts: str = "builtin",
               max_tokens: int = 256, use_fast: bool = True, device: str = "cpu", show_progress: bool = True) -> dict:
    """Score the grid, keep the chosen merge; returns the record written to merge_auto.json."""
    import importlib.util

    from ..monitor import checkpoint_nll, load_texts
    from .merge import _check, merge
    from .writing import atomic_dir
    if "{model}" not in vqa_eval:
        raise ConfigError("--vqa-eval must contain {model}, where the merged folder's path goes, e.g. "
                          "\"python eval_vqa.py --model {model} --split val\"")
    if vqa_budget < 0:
        raise ConfigError(f"--vqa-budget {vqa_budget} is negative; give the VQA drop you accept (default 0.01)")
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("merge --alpha auto draws its Pareto front with matplotlib: pip install matplotlib")
    for d in densities:
        _check(list(alphas), sparsify_method, d)
    load_texts(texts)  # a bad text set fails before anything is merged

    def nll(path) -> float:
        return checkpoint_nll(path, texts, max_tokens=max_tokens, use_fast=use_fast, device=device)
    with atomic_dir(out) as tmp:
        ref = {"nll_vlm": nll(vlm), "nll_base": nll(base_llm), "vqa_vlm": vqa_score(vqa_eval, Path(vlm)),
               "budget": vqa_budget}
        points, best_dir = [], None
        for d in densities:
            for a in alphas:
                folder = tmp / f"point-{len(points)}"
                merge(vlm, base_llm, [a], str(folder), density=d, sparsify_method=sparsify_method, seed=seed,
                      show_progress=show_progress)
                p = {"alpha": a, "density": d, "lang_nll": nll(folder), "vqa": vqa_score(vqa_eval, folder)}
                p["recovery"] = recovery(ref["nll_vlm"], p["lang_nll"], ref["nll_base"])
                points.append(p)
                best = choose(points, ref["vqa_vlm"], vqa_budget)
                if best is p:
                    if best_dir is not None:
                        shutil.rmtree(best_dir)
                    best_dir = folder
                else:
                    shutil.rmtree(folder)
                print(f"[merge auto] α {a:g}, density {d:g}: lang_nll {p['lang_nll']:.4f} (recovery "
                      f"{p['recovery']:+.1%}), VQA {p['vqa']:.4f}", flush=True)
        chosen = choose(points, ref["vqa_vlm"], vqa_budget)
        if chosen is not None:
            best_dir.rename(tmp / "model")
        rec = {"rule": "admitted: VQA >= VQA(VLM) - budget; chosen: the admitted point with the highest language "
                       "recovery (ties: smaller alpha, then larger density); none admitted: no merge",
               "vlm": str(Path(vlm).absolute()), "base_llm": str(Path(base_llm).absolute()), "texts": texts,
               "vqa_eval": vqa_eval, "sparsify": sparsify_method, **ref, "points": points,
               "chosen": None if chosen is None else {"alpha": chosen["alpha"], "density": chosen["density"]}}
        (tmp / "merge_auto.json").write_text(json.dumps(rec, indent=2) + "\n")
        plot(points, ref["vqa_vlm"], vqa_budget, chosen, tmp / "merge_auto.png",
             f"merge --alpha auto: {Path(vlm).name} + {Path(base_llm).name}")
        print(curve_text(points, ref, chosen), flush=True)
    return rec
