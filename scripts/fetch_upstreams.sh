#!/usr/bin/env bash
# Clone the upstreams that are not on PyPI (Bunny, NVILA) at the pins the plugin is tested against, into DIR,
# and print the two variables that make `bash scripts/test.sh` build their environments and run their tests.
#   bash scripts/fetch_upstreams.sh [DIR]      (default: ./upstreams; needs git and network)
# A mirror can stand in for GitHub: VLM_PRESERVE_BUNNY_URL / VLM_PRESERVE_NVILA_URL.
set -euo pipefail
dir="${1:-upstreams}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
fetch() {  # name url commit
  local dest="$dir/$1"
  if [ ! -d "$dest/.git" ]; then
    git clone --quiet --no-checkout --filter=blob:none "$2" "$dest"
  fi
  git -C "$dest" checkout --quiet --detach "$3" || {
    echo "fetch_upstreams.sh: commit $3 not found in $2" >&2; exit 1; }
  echo "[fetch] $1 at $(git -C "$dest" rev-parse --short=7 HEAD) in $dest" >&2
}
fetch bunny "${VLM_PRESERVE_BUNNY_URL:-https://github.com/BAAI-DCAI/Bunny}" 08273acbd83b6836c03dce25cc134eb6b9cedba5
fetch nvila "${VLM_PRESERVE_NVILA_URL:-https://github.com/NVlabs/VILA}" b760c34b9487fd736b4075f5111fbef3d80a37e9
echo "export VLM_PRESERVE_BUNNY_SRC=$dir/bunny VLM_PRESERVE_NVILA_SRC=$dir/nvila"
