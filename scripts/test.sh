#!/usr/bin/env bash
# The test command: every environment, one after the other; fails if any fails or collects no test.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
envs=(llava transformers study llamafactory swift)
# Framework environments (on PyPI, always run) and the study's (the demo's own environment, its real pretrained
# parts and data): their test file runs there only, and in full.
frameworks=(--ignore=tests/test_llamafactory.py --ignore=tests/test_swift.py --ignore=tests/test_study.py)
# Upstreams that are not on PyPI run only where a checkout is given (never committed here; .ci/run extracts the
# snapshots, scripts/fetch_upstreams.sh clones them). Without one their tests are collected in the llava environment
# and skipped with the reason; with one they run in their own environment only, where a skip fails the run.
elsewhere=()
if [ -n "${VLM_PRESERVE_BUNNY_SRC:-}" ]; then
  if [ ! -f "$VLM_PRESERVE_BUNNY_SRC/bunny/train/train.py" ]; then
    echo "test.sh: VLM_PRESERVE_BUNNY_SRC=$VLM_PRESERVE_BUNNY_SRC has no bunny/train/train.py: point it at a checkout" \
         "of BAAI-DCAI/Bunny@08273ac (scripts/fetch_upstreams.sh makes one) or unset it" >&2; exit 2
  fi
  envs+=(bunny); elsewhere+=(--ignore=tests/test_bunny.py)
fi
if [ -n "${VLM_PRESERVE_NVILA_SRC:-}" ]; then
  if [ ! -f "$VLM_PRESERVE_NVILA_SRC/llava/train/train_mem.py" ]; then
    echo "test.sh: VLM_PRESERVE_NVILA_SRC=$VLM_PRESERVE_NVILA_SRC has no llava/train/train_mem.py: point it at a" \
         "checkout of NVlabs/VILA@b760c34 (scripts/fetch_upstreams.sh makes one) or unset it" >&2; exit 2
  fi
  envs+=(nvila); elsewhere+=(--ignore=tests/test_nvila.py)
fi
# each environment's wall time, printed at the end, so a slow run says where its time went
timings=()
for env in "${envs[@]}"; do
  started=$SECONDS
  bash scripts/setup_env.sh "$env"
  # the plugin itself, editable, so the environment has the console scripts (llava-train, vlm-preserve, ...)
  ".venv/$env/bin/python" -m pip --disable-pip-version-check -q install --no-deps -e .
  echo "[test] environment $env"
  path="$PWD/plugin:$PWD/tests"
  tests=(${elsewhere[@]+"${elsewhere[@]}"} "${frameworks[@]}")
  if [ "$env" = study ]; then
    tests=(tests/test_study.py)
  elif [ "$env" = llamafactory ] || [ "$env" = swift ]; then
    path="$path:$PWD/third_party/cpu_shims"
    tests=("tests/test_$env.py")
  elif [ "$env" = bunny ]; then
    path="$path:$(cd "$VLM_PRESERVE_BUNNY_SRC" && pwd):$PWD/third_party/bunny/cpu_shims"
    tests=(tests/test_bunny.py tests/test_losses.py)
  elif [ "$env" = nvila ]; then
    path="$path:$(cd "$VLM_PRESERVE_NVILA_SRC" && pwd):$PWD/third_party/nvila/cpu_shims"
    tests=(tests/test_nvila.py tests/test_losses.py)
  fi
  # pytest exits 5 when it collects nothing: with `set -e` that fails the run, as it must.
  VLM_PRESERVE_TEST_ENV="$env" PYTHONPATH="$path" ".venv/$env/bin/python" -m pytest -p no:cacheprovider --durations=10 "${tests[@]+"${tests[@]}"}" "$@"
  if [ "$env" = study ]; then
    # The demo's real path, nothing cached: every pinned source installed by name, loaded and checked, every cache
    # built, two tuning steps, a handful of items scored, the table printed. A vanished source fails here.
    smoke="$(mktemp -d)"
    echo "[test] smoke of the demo's real path: .venv/study/bin/vlm-preserve demo --smoke --out $smoke"
    ".venv/study/bin/vlm-preserve" demo --smoke --out "$smoke"
    rm -rf "$smoke"
  fi
  timings+=("$env $((SECONDS - started)) s")
  echo "[test] environment $env done in $((SECONDS - started)) s (set-up included)"
done
echo "[test] all environments passed: ${envs[*]} ($(IFS=,; echo "${timings[*]}" | sed 's/,/, /g'); total ${SECONDS} s)"
