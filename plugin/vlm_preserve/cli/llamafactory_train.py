"""`llamafactory-train`: LLaMA-Factory's own training run (`run_exp`, what `llamafactory-cli train` runs) with the
plugin's terms added to its SFT trainer.

    llamafactory-train qwen2_5vl_full_sft.yaml                            # plain LLaMA-Factory
    llamafactory-train qwen2_5vl_full_sft.yaml --regularizer rdd,pre --rdd_weight 0.5
    llamafactory-train qwen2_5vl_full_sft.yaml regularizer=rdd,pre rdd_weight=0.5
    # or in the YAML itself:   regularizer: rdd,pre
    #                          rdd_weight: 0.5

Our options are accepted in all three places because LLaMA-Factory users keep a run's settings in its YAML (so
the run file stays complete) and override single keys with `key=value`, while `--flag value` is how llava-train
and the other launchers take them; where a key is given twice the command line wins, as in LLaMA-Factory. Every
other key goes to LLaMA-Factory unchanged. With `regularizer: none` (the default) and no language monitor nothing
is patched: the run is `llamafactory-cli train`'s.

How the terms enter LLaMA-Factory's run: frameworks/llamafactory.py. Full, freeze and LoRA tuning; SFT stage only.
"""
from __future__ import annotations

import os
import sys

COMMAND = "llamafactory-train"
from ..frameworks.llamafactory import INSTALL, preflight


def _fail(msg: str, code: int = 2):
    print(f"{COMMAND}: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _parser():
    from ..options import options_parser
    return options_parser(COMMAND, "LLaMA-Factory's training run with vlm-preserve regularizers. Every key not "
                                   "listed here goes to LLaMA-Factory unchanged; these may also be written as "
                                   "YAML keys or key=value overrides.")


def _as_flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k}", ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return out


def split_arguments(argv: list[str]):
    """(our configs by class, the monitor config, the enabled methods, the monitor's items, LLaMA-Factory's
    arguments), validated (ConfigError)."""
    from llamafactory.hparams import read_args

    parser = _parser()
    _, rest = parser.parse_known_args(argv)
    old = sys.argv
    sys.argv = [COMMAND] + rest
    try:
        theirs = read_args()  # LLaMA-Factory's own reading: YAML/JSON file + key=value overrides, or argv flags
    finally:
        sys.argv = old
    from ..options import option_names, parse_options
    names = set(option_names())
    from_file = {k: theirs.pop(k) for k in list(theirs) if k in names} if isinstance(theirs, dict) else {}
    ours = _as_flags(from_file) + argv  # argparse keeps the last occurrence: the command line wins
    configs, monitor, methods, monitor_items, _ = parse_options(parser, ours)
    return configs, monitor, methods, monitor_items, theirs


def _torchrun(argv: list[str]) -> int | None:
    """As `llamafactory-cli train` does: with several GPUs (or FORCE_TORCHRUN=1) and not yet under torchrun, run
    this command once per process under torchrun, with LLaMA-Factory's environment variables. Its own launcher
    re-runs *its* file, which would drop the terms, so ours re-runs this module. None: run here."""
    if "LOCAL_RANK" in os.environ:
        return None
    from llamafactory.extras.misc import find_available_port, get_device_count, is_env_enabled
    if not (is_env_enabled("FORCE_TORCHRUN") or get_device_count() > 1):
        return None
    import subprocess
    env = os.environ
    cmd = ["torchrun", "--nnodes", env.get("NNODES", "1"), "--node_rank", env.get("NODE_RANK", "0"),
           "--nproc_per_node", env.get("NPROC_PER_NODE", str(get_device_count())),
           "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"),
           "--master_port", env.get("MASTER_PORT", str(find_available_port())), "-m", __name__, *argv]
    return subprocess.run(cmd, env=dict(env)).returncode


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """`callbacks`: TrainerCallbacks for LLaMA-Factory's trainer, as its Python API `run_exp(args, callbacks)`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        print("\nLLaMA-Factory's own keys: llamafactory-cli train -h")
        return 0
    try:
        import llamafactory.train.tuner as tuner
    except ImportError as e:
        _fail(f"{INSTALL}\n({type(e).__name__}: {e})")
    from ..config import ConfigError
    try:  # bad options fail here, before any model loads or torchrun starts
        configs, monitor, names, monitor_items, theirs = split_arguments(argv)
        if names:
            preflight(configs, names, theirs)
    except ConfigError as e:
        _fail(str(e))
    code = _torchrun(argv)
    if code is not None:
        return code
    # run_exp appends LLaMA-Factory's own callbacks to the list it is given: a copy keeps the caller's intact
    if not names and not monitor_items:
        tuner.run_exp(theirs, list(callbacks or []))  # nothing of ours: LLaMA-Factory's run as it is
        return 0

    from ..frameworks.llamafactory import run_with_terms
    built = run_with_terms(theirs, list(callbacks or []), configs, monitor, names, monitor_items)
    if not built:  # e.g. a stage or workflow that never built LLaMA-Factory's SFT trainer
        _fail("LLaMA-Factory's run finished without building its SFT trainer, so no term was added; check stage and "
              f"do_train ({os.path.basename(str(argv[0])) if argv else 'no config'}).", code=1)
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # each torchrun process
    entry()
