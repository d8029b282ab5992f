"""The table from the run jsons. Per method, per-item scores are averaged over its seeds (every seed is scored on
the same items), then compared item by item with the base LLM (paired bootstrap, 95% CI) and with the Full-Tuning
runs of the same seeds: recovery = (method − full) / (base − full), its CI from the same resamples of the items.

Those CIs resample items of the seed-averaged runs, so they leave out seed-to-seed variation; the `seeds` block
shows it: every run of a method with several seeds on its own, against the base LLM and against the Full-Tuning run
of the same seed (same projector, same data order), and the spread of those per-seed points.

`write()` fills the generated blocks of a markdown page (between `<!-- generated:table -->` and
`<!-- /generated:table -->`, and `seeds` likewise; the whole file when it has no table block) and draws the plot
beside it, from the jsons alone: a rerun on the same jsons gives the same bytes.
"""
from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from .evaluate import bootstrap, mean, paired_bootstrap, recovery

ORDER = ["base", "full", "attention_tuning", "lora", "soft_label", "dft", "mix", "merge", "rdd_rbf", "rdd_linear", "rdd_l2",
         "pre", "distill", "rdd_pre"]


def load_runs(runs_dir: Path) -> dict:
    runs = {}
    for p in sorted(Path(runs_dir).glob("*.json")):
        rec = json.loads(p.read_text())
        runs.setdefault(rec["method"], []).append(rec)
    for recs in runs.values():
        recs.sort(key=lambda r: -1 if r["seed"] is None else r["seed"])
    return runs


def _sd(xs: list[float]) -> float:
    # by hand: Python 3.11's statistics.stdev fails on some equal floats ('float' object has no attribute 'numerator')
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def _ms(xs) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {_sd(xs):.3f}"


def per_item(recs: list[dict], part: str, key: str) -> list[float]:
    """One value per item: the mean over the runs (seeds); [] where the runs lack the part."""
    cols = [[r[key] for r in rec["items"][part]] for rec in recs if part in rec["items"]]
    if len(cols) != len(recs):
        return []
    return [sum(v) / len(v) for v in zip(*cols)]


def _order(method: str):
    family = "merge" if method.startswith("merge") else method
    return (ORDER.index(family) if family in ORDER else 99, method)


def rows(runs: dict) -> list[dict]:
    """One row per method: summaries, differences from the base LLM and recovery with their CIs."""
    if "base" not in runs:
        raise ValueError("no base run: the table compares every method with the base LLM")
    base, full = runs["base"], runs.get("full")
    out = []
    for method in sorted(runs, key=_order):
        recs = runs[method]
        s = [rec["summary"] for rec in recs]
        row = {"method": method, "seeds": sorted(rec["seed"] for rec in recs if rec["seed"] is not None),
               "language_acc": _ms(x.get("language_acc", float("nan")) for x in s),
               "perplexity": _ms(x.get("perplexity", float("nan")) for x in s),
               "vqa": _ms(x.get("vqa_acc", float("nan")) for x in s),
               "vqa_yes_no": _ms(x.get("vqa_yes_no_acc", float("nan")) for x in s),
               "vqa_other": _ms(x.get("vqa_other_acc", float("nan")) for x in s),
               "wall_s": sum(rec["wall_s"] for rec in recs), "n_lang": s[0].get("language_n", 0)}
        acc, logp = per_item(recs, "language", "acc"), per_item(recs, "language", "logp")
        if acc and per_item(base, "language", "acc"):   # multiple choice: only with --bigbench-tarball
            row["retention"] = paired_bootstrap(acc, per_item(base, "language", "acc"), "ratio")
            row["dlogp"] = paired_bootstrap(logp, per_item(base, "language", "logp"))
        for part in ("chat", "text"):
            m, b = per_item(recs, part, "nll"), per_item(base, part, "nll")
            if not m or not b:
                continue
            row[f"{part}_nll"] = mean(m)
            row[f"d_{part}"] = paired_bootstrap(m, b)
            # against the Full-Tuning runs of the method's own seeds (same projector, same data order), so a
            # one-seed row is not measured against another seed's forgetting
            same = [r for r in full or [] if r["seed"] in row["seeds"]]
            f = per_item(same, part, "nll") if same else []
            if f and method not in ("base", "full"):
                row[f"rec_{part}"] = recovery(m, f, b)
            row[f"{part}_n"] = len(m)
        if "chat" in recs[0]["items"]:
            row["p_end1"] = mean(per_item(recs, "chat", "p_end1"))
        vqa = per_item(recs, "vqa", "acc")
        if vqa:
            row["vqa_ci"] = _ci_of_mean(vqa)
        out.append(row)
    return out


def _ci_of_mean(xs: list[float]):
    return bootstrap([xs], lambda m: m[0])


def ci(t, pct: bool = False) -> str:
    if not t:
        return "—"
    if pct:
        return "{:.0f}% [{:.0f}%, {:.0f}%]".format(*(100 * v for v in t))
    return "{:+.3f} [{:+.3f}, {:+.3f}]".format(*t)


def markdown(table: list[dict]) -> str:
    head = ("| method | seeds | Δ chat NLL vs base (95% CI) | chat recovery (95% CI) | Δ text NLL vs base (95% CI) | "
            "text recovery (95% CI) | p(end after 1st token) | easy-vqa acc | bigbench MC acc | "
            "Δ log p(correct) (95% CI) | wall (s) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in table:
        p_end = f"{r['p_end1']:.3g}" if "p_end1" in r else "—"
        lines.append(f"| {r['method']} | {','.join(map(str, r['seeds'])) or '—'} | {ci(r.get('d_chat'))} | "
                     f"{ci(r.get('rec_chat'), True)} | {ci(r.get('d_text'))} | {ci(r.get('rec_text'), True)} | "
                     f"{p_end} | {r['vqa']} | {r['language_acc']} | {ci(r.get('dlogp'))} | {r['wall_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


def seed_rows(runs: dict) -> list[dict]:
    """One row per run of every method with two or more seeds: Δ NLL vs the base LLM and recovery vs the same
    seed's Full-Tuning run, each with its item CI."""
    base, out = runs["base"], []
    full = {r["seed"]: r for r in runs.get("full", [])}
    # Full-Tuning's mean NLL over all its seeds: at a chaotic regime the same seed is not the same run (another
    # machine, another draw), so recovery is also shown against this, unpaired
    pooled = {p: statistics.mean(x) for p in ("chat", "text") if (x := per_item(list(full.values()), p, "nll"))}
    for method in sorted(runs, key=_order):
        if len(runs[method]) < 2:
            continue
        for rec in runs[method]:
            row = {"method": method, "seed": rec["seed"], "vqa": rec["summary"].get("vqa_acc", float("nan"))}
            for part in ("chat", "text"):
                m, b = per_item([rec], part, "nll"), per_item(base, part, "nll")
                if not m or not b:
                    continue
                row[f"d_{part}"] = paired_bootstrap(m, b)
                f = per_item([full[rec["seed"]]], part, "nll") if rec["seed"] in full else []
                if f and method != "full":
                    row[f"rec_{part}"] = recovery(m, f, b)
                lost = pooled.get(part, 0.0) - statistics.mean(b)
                if lost and method != "full":   # nothing lost (or no Full-Tuning): no recovery to speak of
                    row[f"rec_{part}_pooled"] = (pooled[part] - statistics.mean(m)) / lost
            out.append(row)
    return out


def _spread(xs, kind: str = "nll") -> str:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return "—"
    m, sd = statistics.mean(xs), _sd(xs)
    return {"nll": f"{m:+.3f} ± {sd:.3f}", "pct": f"{100 * m:.0f}% ± {100 * sd:.0f}%", "acc": f"{m:.3f} ± {sd:.3f}"}[kind]


def _pooled(rs: list[dict]) -> str:
    return " / ".join(_spread([r[f"rec_{p}_pooled"] for r in rs], "pct") if all(f"rec_{p}_pooled" in r for r in rs)
                      else "—" for p in ("chat", "text"))


def seed_markdown(rows_: list[dict]) -> str:
    head = ("| method | seed | Δ chat NLL vs base (95% CI) | chat recovery vs same-seed full (95% CI) | "
            "Δ text NLL vs base (95% CI) | text recovery vs same-seed full (95% CI) | easy-vqa acc |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows_:
        lines.append(f"| {r['method']} | {r['seed']} | {ci(r.get('d_chat'))} | {ci(r.get('rec_chat'), True)} | "
                     f"{ci(r.get('d_text'))} | {ci(r.get('rec_text'), True)} | {r['vqa']:.3f} |")
    methods = list(dict.fromkeys(r["method"] for r in rows_))
    lines.append("")
    lines.append("Across seeds (mean ± sd of the per-seed points):")
    lines.append("")
    lines.append("| method | seeds | Δ chat NLL | chat recovery | Δ text NLL | text recovery | chat / text recovery vs "
                 "Full-Tuning's seed mean | easy-vqa acc |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for m in methods:
        rs = [r for r in rows_ if r["method"] == m]

        def pts(key):
            return [r[key][0] if r.get(key) else None for r in rs]
        lines.append(f"| {m} | {len(rs)} | {_spread(pts('d_chat'))} | {_spread(pts('rec_chat'), 'pct')} | "
                     f"{_spread(pts('d_text'))} | {_spread(pts('rec_text'), 'pct')} | {_pooled(rs)} | "
                     f"{_spread([r['vqa'] for r in rs], 'acc')} |")
    return head + "\n".join(lines) + "\n"


def mechanism_rows(runs: dict) -> list[dict]:
    """Per method with mechanism items (study/mechanism.py), seed-averaged per item: RDD's MMD² after − before
    tuning and against the same seeds' Full-Tuning, PRe's cosine to the anchor (and against Full-Tuning), diagnose's
    set-level metrics before → after (mean over seeds), easy-vqa on yes/no and on other questions (CIs over items),
    and how many distinct answers the runs gave, with the most common one's share (a collapse onto one answer shows)."""
    full, out = runs.get("full", []), []
    for method in sorted(runs, key=_order):
        recs = runs[method]
        after = per_item(recs, "mechanism", "mmd2_after")
        if not after:
            continue
        seeds = sorted(r["seed"] for r in recs)
        same = [r for r in full if r["seed"] in seeds]
        row = {"method": method, "seeds": seeds,
               "d_mmd2": paired_bootstrap(after, per_item(recs, "mechanism", "mmd2_before")),
               "pre_cos": _ci_of_mean(per_item(recs, "mechanism", "pre_cos"))}
        if method != "full" and len(same) == len(seeds) and per_item(same, "mechanism", "mmd2_after"):
            row["mmd2_vs_full"] = paired_bootstrap(after, per_item(same, "mechanism", "mmd2_after"))
            row["cos_vs_full"] = paired_bootstrap(per_item(recs, "mechanism", "pre_cos"),
                                                  per_item(same, "mechanism", "pre_cos"))
        for part in ("yes_no", "other"):
            keep = [x["yes_no"] == (part == "yes_no") for x in recs[0]["items"]["vqa"]]
            acc = [a for a, k in zip(per_item(recs, "vqa", "acc"), keep) if k]
            row[f"vqa_{part}"] = _ci_of_mean(acc) if acc else None
        preds = [x.get("pred") for r in recs for x in r["items"]["vqa"]]
        if preds and all(preds):   # runs before predictions were stored have none
            top, k = Counter(preds).most_common(1)[0]
            row["vqa_pred"] = (len(set(preds)), top, k / len(preds))
        diags = [r["diagnose"] for r in recs if r.get("diagnose")]
        if diags:
            row["layers"] = diags[0]["layers"]
            for key, metric, series, i in (("dist0", "mixing", "pairwise_distance", 0),
                                           ("effdim", "effdim", "effective_dim", 1),
                                           ("redundancy", "redundancy", "redundancy", 1)):
                row[key] = tuple(statistics.mean(d[when][metric][series][i] for d in diags)
                                 for when in ("before", "after"))
        out.append(row)
    return out


def mechanism_markdown(rows_: list[dict]) -> str:
    if not rows_:
        return "No run has mechanism items yet.\n"
    layer = rows_[0].get("layers", [0, "?"])[1]
    head = ("| method | seeds | Δ MMD² text–visual at input, after − before (95% CI) | MMD² vs same-seed full | "
            f"cosine of visual tokens to the anchor, hidden state {layer} (95% CI) | cosine vs same-seed full | "
            f"text–visual distance at input, before → after | effective dim. (state {layer}) | "
            f"redundancy (state {layer}) | easy-vqa yes/no | easy-vqa other | easy-vqa answers given: distinct, most "
            "common (share) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")

    def acc(t):
        return "{:.3f} [{:.3f}, {:.3f}]".format(*t) if t else "—"

    def pair(t, f):
        return f"{t[0]:{f}} → {t[1]:{f}}" if t else "—"

    def given(t):
        return f"{t[0]}, {t[1]} ({t[2]:.0%})" if t else "—"
    lines = []
    for r in rows_:
        cos = r["pre_cos"]
        lines.append(f"| {r['method']} | {','.join(map(str, r['seeds']))} | {ci(r['d_mmd2'])} | "
                     f"{ci(r.get('mmd2_vs_full'))} | {cos[0]:.3f} [{cos[1]:.3f}, {cos[2]:.3f}] | "
                     f"{ci(r.get('cos_vs_full'))} | {pair(r.get('dist0'), '.2f')} | {pair(r.get('effdim'), '.0f')} | "
                     f"{pair(r.get('redundancy'), '.3f')} | {acc(r.get('vqa_yes_no'))} | {acc(r.get('vqa_other'))} | "
                     f"{given(r.get('vqa_pred'))} |")
    return head + "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    """Language (Δ chat NLL vs the base LLM, lower is better) against easy-vqa accuracy: one point per method with
    95% CI bars on both axes, the merge α sweep as a line from Full-Tuning."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in table if "d_chat" in r and "vqa_ci" in r]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.axhline(0.0, color="gray", ls="--", lw=1, label="base LLM (no change)")
    for i, r in enumerate(r for r in pts if not r["method"].startswith("merge_a")):
        (y, ylo, yhi), (x, xlo, xhi) = r["d_chat"], r["vqa_ci"]
        # the colour cycle has 10 colours: later methods get another marker, so no two points look alike
        ax.errorbar(x, y, yerr=[[y - ylo], [yhi - y]], xerr=[[x - xlo], [xhi - x]], fmt="o^D"[i // 10 % 3], ms=5,
                    capsize=2, label=r["method"])
    merge = sorted((r for r in pts if r["method"].startswith("merge_a")), key=lambda r: float(r["method"][7:]))
    full = [r for r in pts if r["method"] == "full"]
    if merge:
        line = full + merge
        ax.plot([r["vqa_ci"][0] for r in line], [r["d_chat"][0] for r in line], "k-", lw=1, alpha=0.6)
        for r in merge:
            (y, ylo, yhi), (x, xlo, xhi) = r["d_chat"], r["vqa_ci"]
            ax.errorbar(x, y, yerr=[[y - ylo], [yhi - y]], xerr=[[x - xlo], [xhi - x]], fmt="s", color="k", ms=4,
                        capsize=2, alpha=0.6)
            ax.annotate(f"α={r['method'][7:]}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("easy-vqa accuracy (test questions)")
    ax.set_ylabel("Δ chat response NLL vs base LLM (nats; lower is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def merge_curves(runs: dict, folder: Path, rel: str) -> str:
    """Each auto-merge run's validation curve (study/run.py's auto_merge) as a table row and a Pareto-front PNG in
    `folder` (linked as `rel`/NAME)."""
    from ..offline.merge_auto import choose, plot
    recs = [r for m in sorted(runs, key=_order) for r in runs[m] if r.get("merge")]
    if not recs:
        return "No auto-merge run yet.\n"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["| row | source run | α chosen | validation: recovery at α | easy-vqa at α (source) | curve |",
             "|---|---|---|---|---|---|"]
    for r in recs:
        m = r["merge"]
        pts = [dict(p) for p in m["curve"]]
        chosen = choose(pts, m["reference"]["vqa"], m["vqa_budget"])
        name = f"{r['method']}_s{r['seed']}.png"
        plot(pts, m["reference"]["vqa"], m["vqa_budget"], chosen, folder / name,
             f"{r['method']} seed {r['seed']}: validation, budget {m['vqa_budget']:g}")
        at = f"{chosen['recovery']:+.0%} | {chosen['vqa']:.3f} ({m['reference']['vqa']:.3f})" if chosen else \
            f"— (none within the budget: not merged) | — ({m['reference']['vqa']:.3f})"
        lines.append(f"| {r['method']} | {m['source']} | {m['alpha']:g} | {at} | [{name}]({rel}/{name}) |")
    return "\n".join(lines) + "\n"


def fill(md: Path, block: str, text: str) -> None:
    """Replace the generated block `block` in `md` (or write `text` alone where the file has no such block)."""
    start, end = f"<!-- generated:{block} -->", f"<!-- /generated:{block} -->"
    page = md.read_text() if md.exists() else ""
    if start in page and end in page:
        head, rest = page.split(start, 1)
        page = head + start + "\n" + text + end + rest.split(end, 1)[1]
    else:
        page = text
    md.write_text(page)


# How a reader gets each row's training: the flags (upstream's dataclass dialect, README: Flags) or the step to take.
FLAGS = {"full": "", "attention_tuning": "--regularizer attention_tuning", "soft_label": "--regularizer soft_label",
         "dft": "--regularizer dft", "rdd_rbf": "--regularizer rdd", "rdd_linear": "--regularizer rdd --rdd_kernel linear",
         "rdd_l2": "--regularizer rdd --rdd_kernel l2", "pre": "--regularizer pre", "distill": "--regularizer distill",
         "rdd_pre": "--regularizer rdd,pre", "lora": "--lora_enable True"}


def _flag(method: str, setting: dict) -> str:
    if method.startswith("merge_"):
        return f"{_flag(method[6:], setting)}, then `vlm-preserve merge --alpha auto`"
    if method == "mix":
        return f"no flag: text-only instructions as {setting.get('mix_fraction', 0.2):g} of your samples"
    flags = [FLAGS.get(method, method)] + [
        f"--lora_r {v:g}" if k == "lora_rank" else f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}"
        for k, v in sorted(setting.items())]
    flags = " ".join(f for f in flags if f)
    return f"`{flags}`" if flags else "no flag (upstream as is)"


def _verdict(points: list) -> str:
    """One metric of one method, from its per-seed recoveries (point, low, high) against the same seed's
    Full-Tuning: `keeps` where every seed's 95% CI is above 0 and the seed mean is at least 50%; `partly` where
    every seed's CI is above 0 but the mean is below 50%; `no` otherwise (some seed no better than Full-Tuning)."""
    if not points or any(p is None for p in points):
        return "—"
    if all(p[1] > 0 for p in points):
        return "keeps" if statistics.mean(p[0] for p in points) >= 0.5 else "partly"
    return "no"


def recommend_markdown(runs: dict, margin: float = 0.02) -> str:
    """"Which flag should I pass?": every row with two or more seeds, best first by the seed mean of its chat and
    text recoveries; each metric's verdict by `_verdict`; easy-vqa against Full-Tuning's seed mean (within
    `margin`, the selection rule's, counts as level)."""
    rows_ = seed_rows(runs)
    full_vqa = statistics.mean(r["vqa"] for r in rows_ if r["method"] == "full") if any(
        r["method"] == "full" for r in rows_) else float("nan")
    out = []
    for m in dict.fromkeys(r["method"] for r in rows_):
        if m == "full":
            continue
        rs = [r for r in rows_ if r["method"] == m]
        chat, text = [r.get("rec_chat") for r in rs], [r.get("rec_text") for r in rs]
        if any(x is None for x in chat + text):
            continue
        vqa = statistics.mean(r["vqa"] for r in rs)
        level = "level" if abs(vqa - full_vqa) <= margin else ("higher" if vqa > full_vqa else "lower")
        score = statistics.mean([p[0] for p in chat] + [p[0] for p in text])
        setting = runs[m][0].get("setting") or {}
        out.append((-score, f"| {_flag(m, setting)} | {m} | {len(rs)} | {_spread([p[0] for p in chat], 'pct')} | "
                            f"{_verdict(chat)} | {_spread([p[0] for p in text], 'pct')} | {_verdict(text)} | "
                            f"{_pooled(rs)} | {vqa:.3f} vs {full_vqa:.3f} ({level}) |"))
    head = ("| what to pass | row | seeds | chat recovery (mean ± sd over seeds) | chat kept? | text recovery | "
            "text kept? | chat / text recovery vs Full-Tuning's seed mean | easy-vqa vs Full-Tuning |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(line for _, line in sorted(out)) + "\n"


def write_recommendation(runs_dir: Path, md: Path) -> None:
    """Only the `recommend` block of `md` (README's "Which flag should I pass?"); the page must have the block."""
    try:
        page = md.read_text() if md.exists() else ""
    except UnicodeDecodeError:
        raise ValueError(f"{md} is not a text file: pass the markdown page (README.md) to write into") from None
    if "<!-- generated:recommend -->" not in page:
        raise ValueError(f"{md} has no <!-- generated:recommend --> block: add the two marker lines "
                         "(<!-- generated:recommend --> and <!-- /generated:recommend -->) where the table goes")
    fill(md, "recommend", recommend_markdown(load_runs(runs_dir)))


def write(runs_dir: Path, md: Path) -> Path:
    """The table into `md`'s generated block and the plot beside it (`<md stem>.png`); returns the plot's path."""
    runs = load_runs(runs_dir)
    table = rows(runs)
    png = md.with_suffix(".png")
    fill(md, "table", markdown(table))
    page = md.read_text()
    if "<!-- generated:seeds -->" in page:
        fill(md, "seeds", seed_markdown(seed_rows(runs)))
    if "<!-- generated:merge -->" in page:
        fill(md, "merge", merge_curves(runs, md.parent / f"{md.stem}-merge", f"{md.stem}-merge"))
    if "<!-- generated:recommend -->" in page:
        fill(md, "recommend", recommend_markdown(runs))
    if "<!-- generated:mechanism -->" in page:
        fill(md, "mechanism", mechanism_markdown(mechanism_rows(runs)))
    plot(table, png)
    return png
