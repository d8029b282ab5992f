"""Run an upstream's own `train()` with the plugin's flags added: shared by `llava-train`, `bunny-train`, `nvila-train`.

Our flags are parsed (and validated, before any model loads) with the same HfArgumentParser dialect the
upstreams use; the rest of the command line goes to upstream `train()` untouched. With
`--regularizer none` (the default) and no `--language_monitor`, nothing is patched: the run is plain upstream.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys

from ..frameworks.upstream import UpstreamSpec, preflight
from ..options import given_flags, options_parser


def _parser(spec: UpstreamSpec):
    extra = (spec.extra_arguments,) if spec.extra_arguments else ()
    return options_parser(spec.command, f"Upstream {spec.package} train() with vlm-preserve regularizers. "
                                        "Every flag not listed here goes to upstream unchanged.", extra)


def _fail(spec: UpstreamSpec, msg: str, code: int = 2):
    print(f"{spec.command}: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def run(spec: UpstreamSpec, argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..config import ConfigError
    from ..monitor import LanguageMonitorConfig
    from ..regularizers import config_classes, validate

    parser = _parser(spec)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print(f"\nUpstream flags (ModelArguments, DataArguments, TrainingArguments) are documented by upstream "
              f"{spec.package}: python -m {spec.train_module} --help")
        return
    *cfgs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    extra = cfgs.pop() if spec.extra_arguments else None
    monitor = cfgs.pop()
    configs = {type(c): c for c in cfgs}
    try:
        names = validate(configs, given_flags(argv, [f.name for c in config_classes() for f in dataclasses.fields(c)]))
        monitor_items = monitor.validate(given_flags(argv, [f.name for f in dataclasses.fields(LanguageMonitorConfig)]))
    except ConfigError as e:
        _fail(spec, str(e))
    if "distill" in names and not spec.supports_distill:
        _fail(spec, f"--regularizer distill is not supported by {spec.command} yet: the teacher does not follow "
                    f"{spec.package}'s packed sequences. Use rdd and/or pre here (distill runs with llava-train, "
                    "bunny-train and the Python API).")
    try:
        upstream = importlib.import_module(spec.train_module)
    except ImportError as e:
        _fail(spec, f"{spec.install}\n({type(e).__name__}: {e})")
    wrong = spec.identify(upstream)
    if wrong:
        _fail(spec, f"{wrong}\n{spec.install}")
    try:
        preflight(spec, upstream, configs, names, rest)
    except ConfigError as e:
        _fail(spec, str(e))

    from ..frameworks.upstream import install
    from ..patching import Patches
    with Patches() as patches:
        install(spec, upstream, patches, configs, names, monitor, monitor_items)
        old_argv = sys.argv
        sys.argv = [old_argv[0] if old_argv else spec.command] + rest
        try:
            spec.start(upstream, extra, patches)
        finally:
            sys.argv = old_argv
