#!/usr/bin/env bash
# The test command: every environment, one after the other; fails if any fails or collects no test.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
envs=(llava transformers)
# Upstreams that are not on PyPI run only where a checkout is given (never committed here); without one their
# tests are collected in the llava environment and skipped with the reason, counted in pytest's summary.
if [ -f "${VLM_PRESERVE_BUNNY_SRC:-}/bunny/train/train.py" ]; then envs+=(bunny); fi
if [ -f "${VLM_PRESERVE_NVILA_SRC:-}/llava/train/train_mem.py" ]; then envs+=(nvila); fi
for env in "${envs[@]}"; do
  bash scripts/setup_env.sh "$env"
  echo "[test] environment $env"
  path="$PWD/plugin:$PWD/tests"
  tests=()
  if [ "$env" = bunny ]; then
    path="$path:$(cd "$VLM_PRESERVE_BUNNY_SRC" && pwd):$PWD/third_party/bunny/cpu_shims"
    tests=(tests/test_bunny.py tests/test_losses.py)
  elif [ "$env" = nvila ]; then
    path="$path:$(cd "$VLM_PRESERVE_NVILA_SRC" && pwd):$PWD/third_party/nvila/cpu_shims"
    tests=(tests/test_nvila.py tests/test_losses.py)
  fi
  # pytest exits 5 when it collects nothing: with `set -e` that fails the run, as it must.
  VLM_PRESERVE_TEST_ENV="$env" PYTHONPATH="$path" ".venv/$env/bin/python" -m pytest -p no:cacheprovider --durations=10 "${tests[@]}" "$@"
done
echo "[test] all environments passed: ${envs[*]}"
