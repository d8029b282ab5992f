"""Python API: attach the regularizers to a `transformers.Trainer` (any subclass) or to a model, and detach.

    from vlm_preserve import attach, RDDConfig, PReConfig
    handle = attach(trainer, "rdd,pre", RDDConfig(rdd_weight=0.5), PReConfig(pre_layer="12"))
    trainer.train()
    handle.detach()                      # the trainer and model are back as they were

A language monitor (`lang_nll` logged during training, `monitor.py`) comes with `monitor=LanguageMonitorConfig(...)`,
or alone, without any regularizer: `add_language_monitor(trainer, "builtin", steps=50)`.

The config objects are the ones the CLI flags are generated from (one definition each), passed positionally in
any order, each recognised by its type; a method whose config is not given runs with its defaults. Attach before
`trainer.train()` creates the optimizer, so PRe's head is trained.
"""
from __future__ import annotations

import dataclasses

from .adapters import resolve_adapter
from .attachment import Attachment
from .config import PreserveArguments
from .monitor import LanguageMonitor, LanguageMonitorConfig, monitored_trainer_class
from .regularizers import REGISTRY, config_classes, validate

_UNSET = object()


def make_configs(regularizer: str = "none", *configs, **by_name) -> dict:
    """{config class: instance} for `regularizer`: the given config objects, defaults for the rest.
    `by_name` (rdd=RDDConfig(...), ...) is the keyword form of 0.1, kept for one release."""
    known = config_classes()
    out = {cls: cls() for cls in known}
    out[PreserveArguments] = PreserveArguments(regularizer=regularizer)
    if by_name:
        import warnings
        bad = sorted(set(by_name) - {n for n, c in REGISTRY.items() if c.config_class is not None})
        if bad:
            raise TypeError(f"unexpected keyword arguments {bad}; pass config objects positionally, e.g. "
                            "attach(trainer, 'rdd,pre', RDDConfig(...), PReConfig(...))")
        warnings.warn(f"attach(..., {', '.join(f'{k}=...' for k in by_name)}) is deprecated; pass the config objects "
                      "positionally: attach(trainer, 'rdd,pre', RDDConfig(...), PReConfig(...))",
                      DeprecationWarning, stacklevel=3)
        configs = configs + tuple(c for c in by_name.values() if c is not None)
    for c in configs:
        if type(c) not in known:
            raise TypeError(f"{c!r} is not a config of a registered method; expected instances of "
                            f"{', '.join(k.__name__ for k in known[1:])}")
        if type(c) is PreserveArguments:  # its other options (nonfinite_terms); the methods come as the string
            if c.regularizer not in ("none", regularizer):
                raise TypeError(f"PreserveArguments(regularizer={c.regularizer!r}) disagrees with {regularizer!r}: "
                                "give the methods as the regularizer string only")
            c = dataclasses.replace(c, regularizer=regularizer)
        out[type(c)] = c
    validate(out)  # options of a term that is not enabled are an error, as on the command line
    return out


def _name(regularizer) -> str:
    if regularizer is _UNSET:  # 0.1 defaulted to "rdd" while the CLI defaults to "none": name it
        import warnings
        warnings.warn("attach() without a regularizer name defaults to 'rdd' for one more release; name it, e.g. "
                      "attach(trainer, 'rdd')", DeprecationWarning, stacklevel=3)
        return "rdd"
    if not isinstance(regularizer, str):
        raise TypeError(f"the second argument is the regularizer name (e.g. 'rdd,pre'), not {type(regularizer).__name__}; "
                        "config objects follow it")
    return regularizer


class TrainerHandle:
    """What `attach(trainer, ...)` returns: the trainer, with `detach()` restoring its class and model."""

    def __init__(self, trainer, original_class, monitor: LanguageMonitor | None = None):
        self.trainer, self._original, self.monitor = trainer, original_class, monitor

    @property
    def attachment(self) -> Attachment:
        return self.trainer._vp

    def detach(self) -> None:
        t = self.trainer
        if self.monitor is not None:
            t.remove_callback(self.monitor)
        t._vp.detach()
        t.__class__ = self._original
        for name in ("_vp", "preserver", "_vp_logs", "_vp_micro"):
            t.__dict__.pop(name, None)


def attach(target, regularizer: str = _UNSET, *configs, adapter=None, teacher=None,
           monitor: LanguageMonitorConfig | None = None, **by_name):
    """Attach to a Trainer (returns a TrainerHandle) or to a model (returns an Attachment).
    `teacher`: distill's original LLM as a loaded module (else loaded from `distill.distill_teacher`).
    `monitor`: also log the language monitor (Trainers only)."""
    configs = make_configs(_name(regularizer), *configs, **by_name)
    items = monitor.validate() if monitor is not None else []  # a bad text set fails before anything changes
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover - transformers is a dependency
        Trainer = ()
    if isinstance(target, Trainer):
        from .trainer import preserving_trainer_class
        original = type(target)
        if hasattr(target, "_vp"):
            raise RuntimeError("vlm-preserve: this trainer already has regularizers attached; detach first.")
        adapter = resolve_adapter(target.model, adapter)
        target.__class__ = preserving_trainer_class(original, configs, adapter, teacher)
        try:
            target._vp_setup(configs, adapter, teacher)
            watcher = LanguageMonitor(target, monitor, items) if items else None
        except Exception:
            if hasattr(target, "_vp"):
                target._vp.detach()
            target.__class__ = original
            raise
        if watcher is not None:
            target.add_callback(watcher)
        return TrainerHandle(target, original, watcher)
    if items:
        raise TypeError("vlm-preserve: the language monitor needs a Trainer (it logs through it); attach to the "
                        "trainer, or call language_nll(model, tokenizer) yourself.")
    return Attachment(target, configs, resolve_adapter(target, adapter), teacher=teacher)


def detach(handle) -> None:
    handle.detach()


def preserving_class(base: type, regularizer: str = _UNSET, *configs, adapter=None,
                     monitor: LanguageMonitorConfig | None = None, **by_name) -> type:
    """A subclass of the Trainer class `base` whose instances attach the regularizers when constructed.

    For frameworks that build their trainer inside their own code: rebind their module's name to it before
    their entry point runs (docs/frameworks.md), e.g. `workflow.CustomSeq2SeqTrainer = preserving_class(...)`.
    `monitor`: its instances also log the language monitor."""
    from .trainer import preserving_trainer_class
    configs = make_configs(_name(regularizer), *configs, **by_name)
    cls = preserving_trainer_class(base, configs, adapter)
    return monitored_trainer_class(cls, monitor) if monitor is not None and monitor.enabled else cls
