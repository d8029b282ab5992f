# Shared by finetune.sh, finetune_lora.sh and pretrain.sh (sourced, not run).
# Provides: take_regularizer, llava_train_bin, launch.

# First positional argument = --regularizer value (default none). A first argument that is a flag
# (starts with "-") is not consumed, so `finetune.sh --report_to none` also works.
# Sets REG (as given), REG_TAG (filesystem-friendly: rdd,pre -> rdd-pre) and REG_SHIFT (how many
# arguments the caller must shift: 0 or 1). Usage: take_regularizer "$@"; shift "$REG_SHIFT"
take_regularizer() {
  REG="none"
  REG_SHIFT=0
  if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    REG_SHIFT=1
    [ -z "$1" ] || REG="$1"
  fi
  REG_TAG="${REG//,/-}"
  REG_TAG="${REG_TAG// /}"
}

# Path of the llava-train console script (deepspeed's launcher wants a Python script, and a
# console script is one). Override with LLAVA_TRAIN=/path/to/llava-train.
llava_train_bin() {
  if [ -n "${LLAVA_TRAIN:-}" ]; then
    printf '%s\n' "$LLAVA_TRAIN"
  elif command -v llava-train >/dev/null 2>&1; then
    command -v llava-train
  elif [ "${DRY_RUN:-0}" = "1" ]; then
    echo "[dry-run] note: llava-train is not on PATH; showing the bare name" >&2
    printf '%s\n' "llava-train"
  else
    echo "error: llava-train not found on PATH. Install this package (pip install -e . from the repo root," >&2
    echo "       or bash scripts/setup_env.sh llava and activate .venv/llava), or set LLAVA_TRAIN=/path/to/llava-train." >&2
    return 1
  fi
}

# launch ARG... : run `deepspeed [launcher args] <llava-train> ARG...`, or with DRY_RUN=1 print it
# (shell-quoted, one flag per line) instead.
#   NUM_GPUS=N          -> deepspeed --num_gpus N   (default: every visible GPU)
#   DS_LAUNCHER_ARGS    -> extra launcher words, e.g. "--include localhost:0,1 --master_port 29600"
launch() {
  local bin
  bin="$(llava_train_bin)" || return 1
  local -a head=(deepspeed)
  if [ -n "${NUM_GPUS:-}" ]; then
    head+=(--num_gpus "$NUM_GPUS")
  fi
  if [ -n "${DS_LAUNCHER_ARGS:-}" ]; then
    local -a extra
    read -r -a extra <<< "$DS_LAUNCHER_ARGS"
    head+=("${extra[@]}")
  fi
  head+=("$bin")
  if [ "${DRY_RUN:-0}" = "1" ]; then
    # Launcher and script on the first line, then one flag (with its value) per line.
    local out="" word
    for word in "${head[@]}"; do
      out+="${out:+ }$(_shell_quote "$word")"
    done
    for word in "$@"; do
      if [ "${word#--}" != "$word" ]; then
        out+=$' \\\n    '
      else
        out+=" "
      fi
      out+="$(_shell_quote "$word")"
    done
    printf '%s\n' "$out"
    return 0
  fi
  exec "${head[@]}" "$@"
}

# Quote a word for the shell only when it needs it (printf %q escapes even commas).
_shell_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf '%q' "$1"
  fi
}
