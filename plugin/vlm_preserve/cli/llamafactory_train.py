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

The terms enter through LLaMA-Factory's own objects, rebound for the run: the SFT workflow's trainer class
(`CustomSeq2SeqTrainer`) becomes its preserving subclass, and its `LogCallback` also writes the terms to
`trainer_log.jsonl` (it copies a fixed set of keys). Full, freeze and LoRA tuning; SFT stage only.
"""
from __future__ import annotations

import os
import sys

COMMAND = "llamafactory-train"
INSTALL = "LLaMA-Factory is not installed here: pip install llamafactory==0.9.5 (the tested version)."
LOGGED = ("lm_loss", "lang_nll", "lang_nll_delta")  # besides each term's "<name>_loss"


def _fail(msg: str, code: int = 2):
    print(f"{COMMAND}: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _parser():
    from .launch import options_parser
    return options_parser(COMMAND, "LLaMA-Factory's training run with vlm-preserve regularizers. Every key not "
                                   "listed here goes to LLaMA-Factory unchanged; these may also be written as "
                                   "YAML keys or key=value overrides.")


def _as_flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k}", ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return out


def _value(args, key: str, default=None):
    """A LLaMA-Factory key from its parsed arguments: a dict (YAML / JSON + overrides) or an argv list."""
    if isinstance(args, dict):
        return args.get(key, default)
    for i, a in enumerate(args):
        if a == f"--{key}" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(f"--{key}="):
            return a.split("=", 1)[1]
    return default


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
    from .launch import option_names, parse_options
    names = set(option_names())
    from_file = {k: theirs.pop(k) for k in list(theirs) if k in names} if isinstance(theirs, dict) else {}
    ours = _as_flags(from_file) + argv  # argparse keeps the last occurrence: the command line wins
    configs, monitor, methods, monitor_items, _ = parse_options(parser, ours)
    return configs, monitor, methods, monitor_items, theirs


def preflight(configs: dict, names: list[str], theirs) -> None:
    """What can be refused before LLaMA-Factory loads anything."""
    from ..regularizers import DistillConfig, PReConfig
    stage = _value(theirs, "stage", "sft")
    if stage != "sft":
        _fail(f"the terms are added to LLaMA-Factory's SFT trainer; stage '{stage}' is not supported. Use stage: sft, "
              "or run this stage with llamafactory-cli.")
    tuning = _value(theirs, "finetuning_type", "lora")  # LLaMA-Factory's default
    if "attention_tuning" in names and tuning != "full":
        _fail(f"regularizer attention_tuning decides itself which LLM weights train; it needs finetuning_type: full "
              f"(got {tuning}).")
    if "distill" in names and not configs[DistillConfig].distill_teacher:
        _fail("regularizer distill needs the original LLM as its teacher: distill_teacher: <path or name> (LLaMA-"
              "Factory starts from a whole VLM, so there is no LLM path to default to).")
    if "pre" in names or "distill" in names:
        import transformers
        model = _value(theirs, "model_name_or_path")
        try:
            cfg = transformers.AutoConfig.from_pretrained(model).get_text_config()
        except Exception as e:  # LLaMA-Factory will say it better; the layer range is checked again at attach
            print(f"{COMMAND}: could not read {model}'s config before the run ({type(e).__name__}); layer ranges "
                  "are checked when the model is loaded.", file=sys.stderr)
            return
        if "pre" in names:
            configs[PReConfig].layer_index(cfg.num_hidden_layers)
        if "distill" in names:
            configs[DistillConfig].layer_indices(cfg.num_hidden_layers)


class _Inline:
    """An executor that runs each task when it is submitted."""

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures import Future
        f = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # as a thread pool does: kept in the future, not raised into the caller
            f.set_exception(e)
        return f

    def shutdown(self, wait=True, **kwargs):
        pass


def log_callback_class(base: type, keys: tuple) -> type:
    """LLaMA-Factory's LogCallback whose trainer_log.jsonl lines also carry `keys` (it copies a fixed set)."""

    class PreservingLogCallback(base):
        def _create_thread_pool(self, output_dir):
            # each line written at once, inside on_log: with LLaMA-Factory's background thread the line was written
            # after on_log had returned, and the run's summary log (the same step, no terms) could replace the
            # terms meant for the last step's line before it was written (a test failed that way under load)
            super()._create_thread_pool(output_dir)
            self.thread_pool.shutdown(wait=True)
            self.thread_pool = _Inline()

        def on_log(self, args, state, control, **kwargs):
            last = state.log_history[-1] if state.log_history else {}
            self._vp_extra = {k: last[k] for k in keys if k in last}
            try:
                return super().on_log(args, state, control, **kwargs)
            finally:
                self._vp_extra = {}

        def _write_log(self, output_dir, logs):
            return super()._write_log(output_dir, {**logs, **getattr(self, "_vp_extra", {})})

    PreservingLogCallback.__qualname__ = PreservingLogCallback.__name__ = f"Preserving{base.__name__}"
    return PreservingLogCallback


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
        import llamafactory.train.sft.workflow as workflow
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

    from ..monitor import monitored_trainer_class
    from ..patching import Patches
    from ..trainer import preserving_trainer_class
    built = []
    base = workflow.CustomSeq2SeqTrainer
    cls = preserving_trainer_class(base, configs) if names else base
    if monitor_items:
        cls = monitored_trainer_class(cls, monitor, monitor_items)
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(type(self))

    with Patches() as patches:
        patches.setattr(workflow, "CustomSeq2SeqTrainer", type(cls.__name__, (cls,), {"__init__": __init__}))
        patches.setattr(tuner, "LogCallback", log_callback_class(tuner.LogCallback,
                                                                 LOGGED + tuple(f"{n}_loss" for n in names)))
        tuner.run_exp(theirs, list(callbacks or []))
    if not built:  # e.g. a stage or workflow that never built LLaMA-Factory's SFT trainer
        _fail("LLaMA-Factory's run finished without building its SFT trainer, so no term was added; check stage and "
              f"do_train ({os.path.basename(str(argv[0])) if argv else 'no config'}).", code=1)
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # each torchrun process
    entry()
