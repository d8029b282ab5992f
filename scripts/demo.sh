#!/usr/bin/env bash
# The main command: set up the environment, install the plugin, run the built-in demo.
#   bash scripts/demo.sh [--out DIR] [--regularizer rdd,pre] [--max-steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh llava
.venv/llava/bin/python -m pip --disable-pip-version-check -q install --no-deps --force-reinstall .
exec .venv/llava/bin/vlm-preserve demo "$@"
