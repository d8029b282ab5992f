"""LLaMA-Factory (pip llamafactory): its own training run, `run_exp` (what `llamafactory-cli train` runs), with the
plugin's terms in its SFT trainer. The terms enter through LLaMA-Factory's own objects, rebound for the run: the
SFT workflow's trainer class (`CustomSeq2SeqTrainer`) becomes its preserving subclass, so the loss is taken after
its own `compute_loss` and batches are captured by the transformers-native adapter; its `LogCallback` also writes
the terms to `trainer_log.jsonl` (it copies a fixed set of keys). `llamafactory-train` (cli/llamafactory_train.py)
parses the flags and launches."""
from __future__ import annotations

import sys

INSTALL = "LLaMA-Factory is not installed here: pip install llamafactory==0.9.5 (the tested version)."
LOGGED = ("lm_loss", "lang_nll", "lang_nll_delta")  # besides each term's "<name>_loss"


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


def preflight(configs: dict, names: list[str], theirs) -> None:
    """What can be refused before LLaMA-Factory loads anything (ConfigError)."""
    from ..config import ConfigError
    from ..regularizers import DistillConfig, PReConfig
    stage = _value(theirs, "stage", "sft")
    if stage != "sft":
        raise ConfigError(f"the terms are added to LLaMA-Factory's SFT trainer; stage '{stage}' is not supported. "
                          "Use stage: sft, or run this stage with llamafactory-cli.")
    tuning = _value(theirs, "finetuning_type", "lora")  # LLaMA-Factory's default
    if "attention_tuning" in names and tuning != "full":
        raise ConfigError("regularizer attention_tuning decides itself which LLM weights train; it needs "
                          f"finetuning_type: full (got {tuning}).")
    if "distill" in names and not configs[DistillConfig].distill_teacher:
        raise ConfigError("regularizer distill needs the original LLM as its teacher: distill_teacher: <path or name> "
                          "(LLaMA-Factory starts from a whole VLM, so there is no LLM path to default to).")
    if "pre" in names or "distill" in names:
        import transformers
        model = _value(theirs, "model_name_or_path")
        try:
            cfg = transformers.AutoConfig.from_pretrained(model).get_text_config()
        except Exception as e:  # LLaMA-Factory will say it better; the layer range is checked again at attach
            print(f"[vlm-preserve] could not read {model}'s config before the run ({type(e).__name__}); layer ranges "
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


def run_with_terms(theirs, callbacks: list, configs: dict, monitor, names: list[str], monitor_items) -> bool:
    """LLaMA-Factory's `run_exp(theirs, callbacks)` with its SFT trainer made the preserving one (and the monitor's,
    where it has items); undone afterwards. Returns whether that trainer was built (False: no term was added)."""
    import llamafactory.train.sft.workflow as workflow
    import llamafactory.train.tuner as tuner

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
        tuner.run_exp(theirs, callbacks)
    return bool(built)
