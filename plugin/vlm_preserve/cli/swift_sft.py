"""ms-swift: `swift sft` with the plugin's terms, through ms-swift's own plugin mechanism.

    VLM_PRESERVE="--regularizer rdd,pre --rdd_weight 0.5" \\
        swift sft <your flags> --external_plugins "$(vlm-preserve swift-plugin)"
    swift-sft <your swift sft flags> --regularizer rdd,pre --rdd_weight 0.5      # the same, in one command

How the terms enter ms-swift (its plugin file, the trainer it registers): frameworks/swift.py. `swift-sft` is a
launcher alone: it moves the plugin's flags into VLM_PRESERVE (inherited by the process `swift sft` starts, by
torchrun's workers and by dataloader workers), adds `--external_plugins`, and runs `swift sft`.
"""
from __future__ import annotations

import os
import shlex
import sys

from ..frameworks.swift import ENV, plugin_path

COMMAND = "swift-sft"


def _parser():
    from ..options import options_parser
    return options_parser(COMMAND, "ms-swift's `swift sft` with vlm-preserve regularizers. Every other flag goes to "
                                   f"swift sft unchanged. Or: {ENV}='<these flags>' swift sft ... --external_plugins "
                                   "\"$(vlm-preserve swift-plugin)\".")


def split_flags(argv: list[str], names: set) -> tuple[list[str], list[str]]:
    """(the flags in `names` with their values, everything else in order): `--name value` or `--name=value`."""
    ours, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and a[2:].split("=", 1)[0] in names:
            take = 1 if "=" in a or i + 1 == len(argv) or argv[i + 1].startswith("--") else 2
            ours += argv[i:i + take]
            i += take
        else:
            rest.append(a)
            i += 1
    return ours, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        print("\nms-swift's own flags: swift sft --help")
        return 0
    from ..config import ConfigError
    from ..options import option_names, parse_options
    ours, rest = split_flags(argv, set(option_names()))
    try:  # bad options fail here, before ms-swift starts
        _, _, names, items, _ = parse_options(_parser(), ours)
    except ConfigError as e:
        print(f"{COMMAND}: error: {e}", file=sys.stderr)
        return 2
    import importlib.util
    if importlib.util.find_spec("swift") is None:
        print(f"{COMMAND}: error: ms-swift is not installed in this Python ({sys.executable}): pip install "
              "ms-swift==4.5.3 (the tested version).", file=sys.stderr)
        return 2
    env = dict(os.environ, **{ENV: shlex.join(ours)})
    import subprocess
    # `swift sft` itself (its console script's module), by this interpreter: the `swift` on PATH may be another's
    cmd = [sys.executable, "-m", "swift.cli.main", "sft", *rest]
    cmd += ["--external_plugins", plugin_path()] if names or items else []
    return subprocess.run(cmd, env=env).returncode


def entry() -> None:
    sys.exit(main())
