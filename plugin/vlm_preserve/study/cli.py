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
    p.add_argument("--regime", choices=("mild", "strong"), help="The regime's learning rate, steps and schedule "
                                                                 "(study/sweep.py's REGIMES) in place of --lr, "
                                                                 "--steps and --schedule-steps.")
    p.add_argument("--sweep", action="store_true", help="Run the regime sweep (Full-Tuning over study/sweep.py's "
                                                          "learning rates and steps, validation items only) instead "
                                                          "of the table; resumes.")
    p.add_argument("--sweep-dir", metavar="DIR", help="Where the sweep's jsons are (default <out>/sweep).")
    p.add_argument("--sweep-lrs", default="", help="With --sweep: comma-separated learning rates (default "
                                                   "study/sweep.py's LRS).")
    p.add_argument("--sweep-steps", default="", help="With --sweep: comma-separated steps to evaluate at; the run "
                                                     "is a cosine schedule over the largest (default STEPS).")
    p.add_argument("--sweep-report", metavar="MD", help="Only write the sweep's table from its jsons into this "
                                                         "markdown file and print the chosen setting.")
    p.add_argument("--select", action="store_true", help="Run the selection sweep (study/select.py's GRID, each "
                                                           "setting on validation items at --regime) instead of the "
                                                           "table; resumes.")
    p.add_argument("--select-methods", default="", help="With --select: comma-separated methods (default: all of "
                                                        "GRID, in its plan's order).")
    p.add_argument("--select-report", metavar="MD", help="Only write the selection table of --select-dir for "
                                                          "--regime into this markdown file.")
    p.add_argument("--report", metavar="MD", help="Only write the table of the finished runs to this markdown "
                                                   "file (and a plot beside it); train nothing.")
    p.add_argument("--recommend", metavar="MD", help="Only write the \"Which flag should I pass?\" table of the "
                                                      "finished runs into this file's <!-- generated:recommend --> "
                                                      "block (README.md); train nothing.")


def config(args) -> StudyConfig:
    kw = {}
    for f in dataclasses.fields(StudyConfig):
        if f.name == "tasks":
            continue
        v = getattr(args, f.name)
        if isinstance(f.default, tuple):
            cast = float if f.name in ("merge_alphas", "merge_grid") else (int if f.name == "seeds" else str)
            v = tuple(cast(x) for x in str(v).split(",") if x)
        kw[f.name] = v
    if getattr(args, "regime", None):
        from .sweep import REGIMES
        kw.update(REGIMES[args.regime])
    return StudyConfig(**kw)


def run(args) -> int:
    from .report import write
    try:
        cfg = config(args)
        cfg.validate()
    except ValueError as e:  # a bad flag: say so before anything loads
        raise SystemExit(f"vlm-preserve study: {e}") from None
    if args.sweep_report:
        from .sweep import report
        chosen = report(Path(args.sweep_dir or Path(cfg.out) / "sweep"), Path(args.sweep_report))
        print(f"[sweep] wrote {args.sweep_report}; chosen: " +
              (f"lr {chosen['lr']:g}, {chosen['step']} steps" if chosen else "none (no setting meets the rule)"))
        return 0
    if args.select or args.select_report:
        if not args.regime:
            raise SystemExit("vlm-preserve study: --select and --select-report need --regime mild or strong")
        from . import select
        d = Path(cfg.select_dir or Path(cfg.out) / "select" / args.regime)
        if args.select_report:
            chosen = select.report(d, Path(args.select_report), args.regime)
            print(f"[select] wrote {args.select_report}; chosen: " + "; ".join(f"{m} {s or 'default'}"
                                                                             for m, s in chosen.items()))
            return 0
        from .run import Study
        methods = [m for m in args.select_methods.split(",") if m] or None
        done = select.run(Study(cfg), d, args.regime, methods=methods, seed=cfg.seeds[0])
        print(f"[select] finished now: {', '.join(done) or 'nothing (all stored)'}")
        return 0
    if args.report or args.recommend:
        runs_dir = Path(cfg.runs_dir or Path(cfg.out) / "runs")
        if args.report:
            png = write(runs_dir, Path(args.report))
            print(f"[study] wrote {args.report} and {png}")
        if args.recommend:
            from .report import write_recommendation
            try:
                write_recommendation(runs_dir, Path(args.recommend))
            except ValueError as e:
                raise SystemExit(f"vlm-preserve study: {e}")
            print(f"[study] wrote the recommendation into {args.recommend}")
        return 0
    from .run import Study
    if args.sweep:
        from . import sweep
        lrs = tuple(float(x) for x in args.sweep_lrs.split(",") if x) or sweep.LRS
        steps = tuple(int(x) for x in args.sweep_steps.split(",") if x) or sweep.STEPS
        done = sweep.run(Study(cfg), Path(args.sweep_dir or Path(cfg.out) / "sweep"), lrs=lrs, steps=steps,
                         seed=cfg.seeds[0])
        print(f"[sweep] finished now: {', '.join(done) or 'nothing (all stored)'}")
        return 0
    done = Study(cfg).run()
    print(f"[study] finished now: {', '.join(done) or 'nothing (all runs exist)'}")
    return 0
