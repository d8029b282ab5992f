#!/usr/bin/env bash
# The test command: every environment, one after the other; fails if any fails or collects no test.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
envs=(llava transformers)
for env in "${envs[@]}"; do
  bash scripts/setup_env.sh "$env"
  echo "[test] environment $env"
  # pytest exits 5 when it collects nothing: with `set -e` that fails the run, as it must.
  VLM_PRESERVE_TEST_ENV="$env" PYTHONPATH="$PWD/plugin:$PWD/tests" ".venv/$env/bin/python" -m pytest -p no:cacheprovider "$@"
done
echo "[test] all environments passed: ${envs[*]}"
