"""`vlm-preserve study`: flags are StudyConfig's fields (defaults: the full table, 3 seeds)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .run import StudyConfig


def add_arguments(p) -> None:
    for f in dataclasses.fields(StudyConfig):
        if f.name == "tasks":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "out":
            p.add_argument(flag, required=True, help="Results directory (runs/*.json, checkpoints, caches).")
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            p.add_argument(flag, default=",".join(map(str, default)), help=f"comma-separated (default {default})")
        else:
            p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--report", metavar="MD", help="Only write the table of the finished runs to this markdown "
                                                   "file (and a plot beside it); train nothing.")


def config(args) -> StudyConfig:
    kw = {}
    for f in dataclasses.fields(StudyConfig):
        if f.name == "tasks":
            continue
        v = getattr(args, f.name)
        if isinstance(f.default, tuple):
            cast = float if f.name == "merge_alphas" else (int if f.name == "seeds" else str)
            v = tuple(cast(x) for x in str(v).split(",") if x)
        kw[f.name] = v
    return StudyConfig(**kw)


def run(args) -> int:
    from .report import load_runs, markdown, plot, rows
    try:
        cfg = config(args)
        cfg.validate()
    except ValueError as e:  # a bad flag: say so before anything loads
        raise SystemExit(f"vlm-preserve study: {e}") from None
    if args.report:
        runs = load_runs(cfg.out)
        md = Path(args.report)
        md.write_text(markdown(rows(runs)))
        plot(runs, md.with_suffix(".png"))
        print(f"[study] wrote {md} and {md.with_suffix('.png')}")
        return 0
    from .run import Study
    done = Study(cfg).run()
    print(f"[study] finished now: {', '.join(done) or 'nothing (all runs exist)'}")
    return 0
