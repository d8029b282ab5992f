"""`llava-train`: upstream LLaVA's own `train()` with the plugin's flags added (the integration: frameworks/llava.py).

    llava-train <the upstream flags you already pass> --regularizer rdd,pre [--rdd_weight 1.0 ...]
"""
from __future__ import annotations

from ..frameworks.llava import SPEC
from .launch import _parser as _spec_parser, run


def _parser():
    return _spec_parser(SPEC)


def main(argv: list[str] | None = None) -> None:
    run(SPEC, argv)


if __name__ == "__main__":
    main()
