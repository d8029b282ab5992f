"""Write a diagnose report: `diagnose.json` (every number), one PNG per metric (layers on x, a line per
checkpoint, one panel per series) and `summary.md`."""
from __future__ import annotations

import json
import math
from pathlib import Path

# what each series means, for plot titles and the summary
SERIES = {
    "pairwise_distance": "mean ‖text − visual‖ (same sample)",
    "mmd2": "RBF-MMD² text vs visual",
    "cohesion": "intra-object cohesion (↑)",
    "coupling": "inter-object coupling (↓)",
    "contrast": "contrast = cohesion / coupling (↑)",
    "effective_dim": "PCA effective dim @95% (↑)",
    "redundancy": "mean |off-diag corr| (↓)",
    "accuracy": "linear-probe accuracy (CV)",
}
PLOTTED = {"probe": ("accuracy",)}  # probe's folds/std/chance go to the JSON, not a panel


def _clean(x):
    """JSON has no NaN: undefined values (e.g. no image with two classes) are written as null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_report(report: dict, out: str | Path) -> dict:
    """Writes the three outputs; returns {"json": path, "summary": path, "plots": {metric: path}}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(_clean(report), indent=1))
    plots = {m: plot_metric(report, m, out / f"{m}.png") for m in report["metrics"]}
    (out / "summary.md").write_text(summary(report))
    return {"json": out / "diagnose.json", "summary": out / "summary.md", "plots": plots}


def plot_metric(report: dict, metric: str, path: Path) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError("the diagnose plots need matplotlib: pip install 'vlm-preserve-plugin[diagnose]' "
                          "(or pip install matplotlib)") from e
    first = report["results"][report["checkpoints"][0]][metric]
    series = PLOTTED.get(metric, tuple(first))
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False)
    for ax, s in zip(axes[0], series):
        for name in report["checkpoints"]:
            ax.plot(report["layers"], report["results"][name][metric][s], marker="o", ms=3, label=name)
        ax.set_title(SERIES.get(s, s), fontsize=10)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{metric} — {report['samples']} samples", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def summary(report: dict, max_columns: int = 9) -> str:
    """Per metric series, a table: a row per checkpoint, a column per layer (at most `max_columns`,
    evenly spaced, first and last always in)."""
    layers = report["layers"]
    cols = min(max_columns, len(layers))
    idx = sorted({round(i * (len(layers) - 1) / max(cols - 1, 1)) for i in range(cols)})
    lines = ["# vlm-preserve diagnose", "",
             f"{report['samples']} samples; checkpoints: {', '.join(report['checkpoints'])}. "
             "Layer 0 = embeddings entering the LLM, l = output of decoder layer l. "
             "Every number for every layer: `diagnose.json`; plots: `<metric>.png`.", ""]
    for metric in report["metrics"]:
        first = report["results"][report["checkpoints"][0]][metric]
        for s in PLOTTED.get(metric, tuple(first)):
            lines += [f"## {metric}: {SERIES.get(s, s)}", "",
                      "| checkpoint | " + " | ".join(f"L{layers[i]}" for i in idx) + " |",
                      "|---|" + "---|" * len(idx)]
            for name in report["checkpoints"]:
                vals = report["results"][name][metric][s]
                lines.append(f"| {name} | " + " | ".join(_fmt(vals[i]) for i in idx) + " |")
            lines.append("")
        if metric == "probe":
            chance = report["results"][report["checkpoints"][0]]["probe"]["chance"][0]
            lines += [f"Chance level (majority label): {_fmt(chance)}.", ""]
    return "\n".join(lines)
