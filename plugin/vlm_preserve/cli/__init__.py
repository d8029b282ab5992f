"""`vlm-preserve`: the command group: check-upstream, demo, diagnose, merge, extract-llm, eval-language."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlm-preserve", description=__doc__.split(":")[1].strip())
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-upstream", help="Verify the upstream symbols the plugin touches, then run one tiny "
                                              "patched forward+backward.")
    c.add_argument("upstream", choices=["llava", "bunny", "nvila", "transformers"])
    c.add_argument("--source", help="Check this upstream source tree (a checkout) instead of the installed package.")
    c.add_argument("--skip-run", action="store_true", help="Only check symbols and signatures.")

    d = sub.add_parser("demo", help="Run llava-train with regularizers on a built-in tiny fixture and show the "
                                    "logged terms (the real reproduction replaces this in a later release).")
    d.add_argument("--out", default="runs/demo", help="Directory for the fixture and the run (default runs/demo).")
    d.add_argument("--regularizer", default="rdd,pre")
    d.add_argument("--max-steps", type=int, default=8)

    from . import diagnose, offline
    diagnose.add_parser(sub)
    offline.register(sub)

    args = p.parse_args(argv)
    if args.command in ("merge", "extract-llm", "eval-language"):
        return offline.run(args)
    if args.command == "check-upstream":
        from ..upstream_check import check_upstream
        return check_upstream(args.upstream, source=args.source, run=not args.skip_run)
    if args.command == "demo":
        from .demo import demo
        return demo(args.out, args.regularizer, args.max_steps)
    if args.command == "diagnose":
        return diagnose.run(args)
    return 2


def entry() -> None:
    sys.exit(main())
