"""Run an upstream's own `train()` with the plugin's flags added: shared by `llava-train`, `bunny-train`, `nvila-train`.

Our flags are parsed (and validated, before any model loads) with the same HfArgumentParser dialect the
upstreams use; the rest of the command line goes to upstream `train()` untouched. With
`--regularizer none` (the default) and no `--language_monitor`, nothing is patched: the run is plain upstream.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import LossScaling


def upstream_train(upstream, extra, patches) -> None:
    """The default `UpstreamSpec.start`: upstream's own train()."""
    upstream.train()


@dataclass(frozen=True)
class UpstreamSpec:
    command: str                 # console script name
    package: str                 # import name
    train_module: str            # module whose train() runs, and whose globals are rebound
    trainer: str                 # the Trainer class name train() looks up in train_module
    model_registry: str          # module whose import registers the upstream's configs with AutoConfig
    install: str                 # how to install it
    identify: Callable[[object], Optional[str]]  # given train_module: None if right, else what was found
    data_module: str = ""        # module defining LazySupervisedDataset / DataCollatorForSupervisedDataset (the
    #                              distill route field is carried through them)
    supports_distill: bool = False  # can the teacher follow this upstream's sequences (NVILA packs them: no)
    llm_config_folder: str = ""  # where the LLM's config.json is when the checkpoint's own has no layer count
    adapter: str = "llava"       # a name in vlm_preserve.adapters.ADAPTERS
    loss_scaling: LossScaling = LossScaling()  # what upstream's trainer does to the loss compute_loss returns
    head_filters: tuple = ("get_peft_state_maybe_zero_3", "get_peft_state_non_lora_maybe_zero_3")  # in train_module,
    # or "module:function": export helpers whose state dicts must not carry the training-only heads
    extra_arguments: Optional[type] = None  # a dataclass of launcher flags of this command
    start: Callable = upstream_train  # start(upstream, extra_args, patches): runs training


def options_parser(prog: str, description: str, extra: tuple = ()):
    """The plugin's own flags (every registered method's config and the language monitor, plus `extra`
    dataclasses), in upstream's HfArgumentParser dialect: one definition per flag for every launcher."""
    from transformers import HfArgumentParser

    from ..monitor import LanguageMonitorConfig
    from ..regularizers import REGISTRY, config_classes
    parser = HfArgumentParser(config_classes() + (LanguageMonitorConfig,) + tuple(extra), allow_abbrev=False,
                              prog=prog, description=description)
    for action in parser._actions:  # the registry's names, so a method registered from outside is listed too
        if action.dest == "regularizer":
            action.help = f"{action.help} Methods: {', '.join(REGISTRY)}."
    return parser


def option_names() -> list[str]:
    from ..monitor import LanguageMonitorConfig
    from ..regularizers import config_classes
    return [f.name for c in config_classes() + (LanguageMonitorConfig,) for f in dataclasses.fields(c)]


def parse_options(parser, argv: list[str]):
    """(configs by class, monitor config, enabled method names, monitor items, the rest of argv), validated:
    ConfigError on a bad option. `parser` from options_parser without extras."""
    from ..regularizers import validate
    *cfgs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    monitor = cfgs.pop()
    configs = {type(c): c for c in cfgs}
    given = given_flags(argv, option_names())
    return configs, monitor, validate(configs, given), monitor.validate(given), rest


def _parser(spec: UpstreamSpec):
    extra = (spec.extra_arguments,) if spec.extra_arguments else ()
    return options_parser(spec.command, f"Upstream {spec.package} train() with vlm-preserve regularizers. "
                                        "Every flag not listed here goes to upstream unchanged.", extra)


def given_flags(argv: list[str], names) -> set[str]:
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")} & set(names)


def _fail(spec: UpstreamSpec, msg: str, code: int = 2):
    print(f"{spec.command}: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def preflight(spec: UpstreamSpec, upstream, configs: dict, names: list[str], upstream_argv: list[str]):
    """Everything checkable before a model loads: upstream's own flags, flag combinations, layer range."""
    import transformers

    from ..regularizers import DistillConfig, PReConfig
    parser = transformers.HfArgumentParser((upstream.ModelArguments, upstream.DataArguments, upstream.TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=upstream_argv)
    if not names:
        return
    if model_args.vision_tower is None:
        _fail(spec, f"--regularizer {','.join(names)} needs a vision tower (--vision_tower); without one upstream "
                    "trains a plain language model and there is nothing to regularize.")
    if "attention_tuning" in names and (training_args.lora_enable or getattr(model_args, "tune_mm_mlp_adapter", False)):
        _fail(spec, "--regularizer attention_tuning is an alternative to --lora_enable / --tune_mm_mlp_adapter "
                    "(it decides itself which LLM weights train); drop one of them.")
    if "pre" in names or "distill" in names:
        importlib.import_module(spec.model_registry)
        cfg = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path)
        llm_dir = os.path.join(model_args.model_name_or_path, spec.llm_config_folder)
        if not hasattr(cfg, "num_hidden_layers") and spec.llm_config_folder and os.path.isdir(llm_dir):
            cfg = transformers.AutoConfig.from_pretrained(llm_dir)
    if "pre" in names:
        configs[PReConfig].layer_index(cfg.num_hidden_layers)
    if "distill" in names:
        distill = configs[DistillConfig]
        distill.layer_indices(cfg.num_hidden_layers)
        # upstream builds the VLM on --model_name_or_path's LLM (stage 2 starts from the base LLM): the teacher
        distill.distill_teacher = distill.distill_teacher or model_args.model_name_or_path
        teacher = transformers.AutoConfig.from_pretrained(distill.distill_teacher)
        if getattr(teacher, "mm_vision_tower", None):
            _fail(spec, f"the distillation teacher {distill.distill_teacher} is a vision-language checkpoint (the "
                        "teacher defaults to --model_name_or_path); pass the original LLM with --distill_teacher PATH.")
        if teacher.num_hidden_layers != cfg.num_hidden_layers:
            _fail(spec, f"--distill_teacher {distill.distill_teacher} has {teacher.num_hidden_layers} layers, the "
                        f"model {cfg.num_hidden_layers}; the teacher must be the LLM the VLM was built from.")


def run(spec: UpstreamSpec, argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..config import ConfigError
    from ..monitor import LanguageMonitorConfig
    from ..regularizers import DistillConfig, config_classes, validate

    parser = _parser(spec)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print(f"\nUpstream flags (ModelArguments, DataArguments, TrainingArguments) are documented by upstream "
              f"{spec.package}: python -m {spec.train_module} --help")
        return
    *cfgs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    extra = cfgs.pop() if spec.extra_arguments else None
    monitor = cfgs.pop()
    configs = {type(c): c for c in cfgs}
    try:
        names = validate(configs, given_flags(argv, [f.name for c in config_classes() for f in dataclasses.fields(c)]))
        monitor_items = monitor.validate(given_flags(argv, [f.name for f in dataclasses.fields(LanguageMonitorConfig)]))
    except ConfigError as e:
        _fail(spec, str(e))
    if "distill" in names and not spec.supports_distill:
        _fail(spec, f"--regularizer distill is not supported by {spec.command} yet: the teacher does not follow "
                    f"{spec.package}'s packed sequences. Use rdd and/or pre here (distill runs with llava-train, "
                    "bunny-train and the Python API).")
    try:
        upstream = importlib.import_module(spec.train_module)
    except ImportError as e:
        _fail(spec, f"{spec.install}\n({type(e).__name__}: {e})")
    wrong = spec.identify(upstream)
    if wrong:
        _fail(spec, f"{wrong}\n{spec.install}")
    try:
        preflight(spec, upstream, configs, names, rest)
    except ConfigError as e:
        _fail(spec, str(e))

    from ..patching import Patches
    with Patches() as patches:
        if names:
            from ..adapters import ADAPTERS
            adapter = ADAPTERS[spec.adapter]()
            from ..attachment import without_heads
            from ..trainer import preserving_trainer_class
            patches.setattr(upstream, spec.trainer, preserving_trainer_class(getattr(upstream, spec.trainer), configs, adapter,
                                                                       scaling=spec.loss_scaling))
            for target in spec.head_filters:
                module, _, fn = target.rpartition(":")
                owner = importlib.import_module(module) if module else upstream
                original = getattr(owner, fn)
                patches.setattr(owner, fn, lambda *a, _f=original, **k: without_heads(_f(*a, **k)))
            from ..adapters.llava import install_route_field
            from ..compat import allow_numpy_rng_state
            allow_numpy_rng_state(patches)
            if "distill" in names and spec.data_module:
                install_route_field(patches, importlib.import_module(spec.data_module),
                                    configs[DistillConfig].distill_route_field)
        if monitor_items:  # on top of the class above, if any: the monitor alone adds only its callback
            from ..monitor import monitored_trainer_class
            patches.setattr(upstream, spec.trainer,
                            monitored_trainer_class(getattr(upstream, spec.trainer), monitor, monitor_items))
        old_argv = sys.argv
        sys.argv = [old_argv[0] if old_argv else spec.command] + rest
        try:
            spec.start(upstream, extra, patches)
        finally:
            sys.argv = old_argv
