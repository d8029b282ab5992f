"""eval-language: how much language ability each VLM lost against its base LLM. lm-evaluation-harness
(`--model hf`) runs on the base LLM and on each VLM's extracted language model (extract-llm); the report is a
table of per-task scores and deltas (VLM − base) as markdown and json, and a bar chart (PNG).

Writes under `out`: `llms/<label>/` (the extracted LLMs), `language_eval.json`, `language_eval.md`,
`language_eval.png`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from .checkpoints import Checkpoint
from .extract import extract_llm

INSTALL = "pip install 'vlm-preserve-plugin[eval]'  (or: pip install lm-eval==0.4.13 matplotlib==3.11.2)"


def _require():
    missing = []
    for module in ("lm_eval", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"eval-language needs {' and '.join(missing)}, which is not installed: {INSTALL}")


def _labels(paths) -> list[str]:
    labels = []
    for p in paths:
        name = Path(p).absolute().name
        labels.append(name if name not in labels and name != "base" else f"{name}-{len(labels) + 1}")
    return labels


def scores(result: dict, tasks) -> dict:
    """{task: {metric: value}} for the requested tasks (groups such as mmlu included), stderr left out."""
    table = {**result.get("results", {}), **result.get("groups", {})}
    out = {}
    for task in tasks:
        if task not in table:
            raise ConfigError(f"lm-eval returned no result for task {task!r} (got: {', '.join(sorted(table))})")
        # metrics are keyed "<metric>,<filter>"; other fields (alias, sample_len) have no comma
        out[task] = {k.split(",")[0]: float(v) for k, v in table[task].items()
                     if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    return out


def evaluate(path: Path, tasks, *, limit, include_path, batch_size, device) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager
    result = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(path), "dtype": "float32"},
                                     tasks=list(tasks), limit=limit, batch_size=batch_size, device=device,
                                     task_manager=TaskManager(include_path=include_path), log_samples=False)
    return scores(result, tasks)


def primary(metrics: dict) -> str:
    for m in ("acc_norm", "acc", "exact_match"):
        if m in metrics:
            return m
    return sorted(metrics)[0]


def report(table: dict, labels, out: Path) -> Path:
    """table: {label: {task: {metric: value}}}, the first label the base LLM."""
    base, vlms = labels[0], labels[1:]
    rows = []
    for task, metrics in table[base].items():
        for metric, b in metrics.items():
            row = {"task": task, "metric": metric, base: b}
            for v in vlms:
                row[v] = table[v][task].get(metric)
                row[f"delta {v}"] = None if row[v] is None else row[v] - b
            rows.append(row)
    (out / "language_eval.json").write_text(json.dumps({"base": base, "vlms": vlms, "rows": rows, "scores": table},
                                                       indent=2) + "\n")
    cols = ["task", "metric", base, *vlms, *(f"delta {v}" for v in vlms)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in cols) + " |" for r in rows]
    md = out / "language_eval.md"
    md.write_text("# Language ability: base LLM vs each VLM's language model\n\n"
                  "Scores from lm-evaluation-harness (`--model hf`); delta = VLM − base.\n\n" + "\n".join(lines) + "\n")
    _chart(table, labels, out / "language_eval.png")
    return md


def _cell(col: str, x) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "n/a"
    return f"{x:+.4f}" if col.startswith("delta ") else f"{x:.4f}"


def _chart(table: dict, labels, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(table[labels[0]])
    metrics = [primary(table[labels[0]][t]) for t in tasks]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(tasks) * len(labels) / 2 + 2), 3.5), dpi=100)
    for i, label in enumerate(labels):
        values = [table[label][t].get(m, 0.0) for t, m in zip(tasks, metrics)]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=label)
    ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n({m})" for t, m in zip(tasks, metrics)])
    ax.set_ylabel("score")
    ax.set_title("Language ability: base LLM vs VLMs")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def eval_language(base: str, vlms, tasks, out: str, *, limit=None, include_path=None, batch_size=1,
                  device="cpu") -> Path:
    _require()
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ConfigError("--tasks is empty: give lm-eval task names, e.g. --tasks arc_easy,openbookqa")
    if Checkpoint(base).layout != "causal-lm":
        raise ConfigError(f"--base {base} is not a plain CausalLM checkpoint: pass the LLM the VLMs were built from.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = ["base", *_labels(vlms)]
    paths = [Path(base)]
    for label, vlm in zip(labels[1:], vlms):
        llm = out / "llms" / label
        if not llm.exists():  # re-running the report reuses earlier extractions
            extract_llm(vlm, llm)
        paths.append(llm)
    kw = dict(limit=limit, include_path=include_path, batch_size=batch_size, device=device)
    table = {label: evaluate(p, tasks, **kw) for label, p in zip(labels, paths)}
    return report(table, labels, out)
