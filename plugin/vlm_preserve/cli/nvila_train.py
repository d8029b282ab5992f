"""`nvila-train`: upstream NVILA's own training run with the plugin's flags added (the integration:
frameworks/nvila.py).

    nvila-train <the upstream flags you already pass> --regularizer rdd,pre
"""
from __future__ import annotations

from ..frameworks.nvila import SPEC
from .launch import run


def main(argv: list[str] | None = None) -> None:
    run(SPEC, argv)


if __name__ == "__main__":
    main()
