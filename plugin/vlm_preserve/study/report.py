"""The table from the run jsons: per method, mean ± std over seeds, and the paired bootstrap against the base LLM
(pooled over seeds: each seed's questions are the same, so seed-runs are stacked as extra paired items)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .evaluate import mean, paired_bootstrap

ORDER = ["base", "full", "attention_tuning", "lora", "soft_label", "mix", "merge", "rdd_rbf", "rdd_linear", "rdd_l2",
         "pre", "distill", "rdd_pre"]


def load_runs(out: Path) -> dict:
    runs = {}
    for p in sorted((Path(out) / "runs").glob("*.json")):
        rec = json.loads(p.read_text())
        runs.setdefault(rec["method"], []).append(rec)
    return runs


def _ms(xs) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def rows(runs: dict) -> list[dict]:
    """One row per method: summaries and the retention CI vs the base LLM."""
    if "base" not in runs:
        raise ValueError("no base run: the table compares every method with the base LLM")
    base = runs["base"][0]["items"]
    key = lambda m: (ORDER.index(m.split("_a")[0]) if m.split("_a")[0] in ORDER else 99, m)  # noqa: E731
    out = []
    for method in sorted(runs, key=key):
        recs = runs[method]
        a = [r["acc"] for rec in recs for r in rec["items"]["language"]]
        b = [r["acc"] for _ in recs for r in base["language"]]
        la = [r["logp"] for rec in recs for r in rec["items"]["language"]]
        lb = [r["logp"] for _ in recs for r in base["language"]]
        ret = paired_bootstrap(a, b, "ratio")
        dlogp = paired_bootstrap(la, lb, "diff")
        s = [rec["summary"] for rec in recs]
        out.append({"method": method, "seeds": sorted(rec["seed"] for rec in recs if rec["seed"] is not None),
                    "language_acc": _ms(x["language_acc"] for x in s), "retention": ret, "dlogp": dlogp,
                    "perplexity": _ms(x["perplexity"] for x in s),
                    "vqa": _ms(x.get("vqa_acc", float("nan")) for x in s),
                    "vqa_yes_no": _ms(x.get("vqa_yes_no_acc", float("nan")) for x in s),
                    "vqa_other": _ms(x.get("vqa_other_acc", float("nan")) for x in s),
                    "wall_s": sum(rec["wall_s"] for rec in recs), "n_lang": s[0]["language_n"]})
    return out


def markdown(table: list[dict]) -> str:
    head = ("| method | seeds | language acc | retention vs base (95% CI) | Δ log p(correct) (95% CI) | perplexity | "
            "easy-vqa acc | yes/no | other | wall (s) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in table:
        p, lo, hi = r["retention"]
        d, dlo, dhi = r["dlogp"]
        lines.append(f"| {r['method']} | {','.join(map(str, r['seeds'])) or '—'} | {r['language_acc']} | "
                     f"{100 * p:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}] | "
                     f"{r['perplexity']} | {r['vqa']} | {r['vqa_yes_no']} | {r['vqa_other']} | {r['wall_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


def plot(runs: dict, path: Path) -> None:
    """Language accuracy vs easy-vqa accuracy, one point per run, one colour per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    base = runs.get("base", [{}])[0].get("summary", {}).get("language_acc")
    if base is not None:
        ax.axhline(base, color="gray", ls="--", lw=1, label="base LLM (language)")
    for method, recs in sorted(runs.items()):
        pts = [(r["summary"]["vqa_acc"], r["summary"]["language_acc"]) for r in recs if "vqa_acc" in r["summary"]]
        if pts:
            ax.scatter(*zip(*pts), label=method, s=25)
    ax.set_xlabel("easy-vqa accuracy")
    ax.set_ylabel("bigbench accuracy (report tasks)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
