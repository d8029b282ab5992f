"""`vlm-preserve`: the command group: check-upstream, demo, study, diagnose, merge, extract-llm, eval-language, lang-nll, swift-plugin."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlm-preserve", description=__doc__.split(":")[1].strip())
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-upstream", help="Verify the upstream symbols the plugin touches, then run one tiny "
                                              "patched forward+backward.")
    c.add_argument("upstream", choices=["llava", "bunny", "nvila", "transformers", "llamafactory", "swift"])
    c.add_argument("--source", help="Check this upstream source tree (a checkout) instead of the installed package.")
    c.add_argument("--skip-run", action="store_true", help="Only check symbols and signatures.")

    d = sub.add_parser("demo", help="The study in miniature: base LLM, Full-Tuning, LoRA, LinguDistill and the merge "
                                    "on SmolLM2 + EfficientNet-Lite0 (easy-vqa); language loss and recovery with CIs "
                                    "beside VQA accuracy.")
    d.add_argument("--out", default="", help="Results directory (default runs/demo, with --smoke runs/demo-smoke); a "
                                             "rerun resumes.")
    d.add_argument("--data-dir", default="", help="Caches (features, SmolLM2 folder, language sets); default "
                                                  "<out>/data.")
    d.add_argument("--tiny", action="store_true", help="A tiny random LLM instead of SmolLM2 (no real model).")
    d.add_argument("--smoke", action="store_true", help="The real path in about two minutes: every real package "
                                                        "loaded and checked, caches built, two tuning steps, a "
                                                        "handful of items scored, the table printed (the test "
                                                        "command runs it; numbers mean nothing).")

    s = sub.add_parser("study", help="The full table (every method × seeds) on SmolLM2 + EfficientNet-Lite0; "
                                     "resumes where it stopped; --report writes the markdown table and plot.")
    from ..study.cli import add_arguments
    add_arguments(s)

    sub.add_parser("swift-plugin", help="Print the path of the file for ms-swift's --external_plugins (options in the "
                                        "VLM_PRESERVE environment variable: docs/frameworks.md).")

    from . import diagnose, offline
    diagnose.add_parser(sub)
    offline.register(sub)

    args = p.parse_args(argv)
    if args.command in ("merge", "extract-llm", "eval-language", "lang-nll"):
        return offline.run(args)
    if args.command == "check-upstream":
        from .check_upstream import check_upstream
        return check_upstream(args.upstream, source=args.source, run=not args.skip_run)
    if args.command == "demo":
        from .demo import demo
        return demo(args.out or ("runs/demo-smoke" if args.smoke else "runs/demo"), args.data_dir, args.tiny,
                    smoke=args.smoke)
    if args.command == "study":
        from ..study.cli import run
        return run(args)
    if args.command == "swift-plugin":
        from ..frameworks.swift import plugin_path
        print(plugin_path())
        return 0
    if args.command == "diagnose":
        return diagnose.run(args)
    return 2


def entry() -> None:
    sys.exit(main())
