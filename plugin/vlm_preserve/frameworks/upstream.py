"""An upstream codebase that runs its own `train()` (LLaVA, Bunny, NVILA): what the plugin needs to know of it
(`UpstreamSpec`), what can be refused before a model loads (`preflight`), and how its Trainer is replaced for the
run (`install`). `cli/launch.py` parses the flags and calls these; `frameworks/<name>.py` holds each one's spec."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import ConfigError, LossScaling


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


def preflight(spec: UpstreamSpec, upstream, configs: dict, names: list[str], upstream_argv: list[str]):
    """Everything checkable before a model loads: upstream's own flags, flag combinations, layer range
    (ConfigError)."""
    import transformers

    from ..regularizers import DistillConfig, PReConfig
    parser = transformers.HfArgumentParser((upstream.ModelArguments, upstream.DataArguments, upstream.TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=upstream_argv)
    if not names:
        return
    if model_args.vision_tower is None:
        raise ConfigError(f"--regularizer {','.join(names)} needs a vision tower (--vision_tower); without one "
                          "upstream trains a plain language model and there is nothing to regularize.")
    if "attention_tuning" in names and (training_args.lora_enable or getattr(model_args, "tune_mm_mlp_adapter", False)):
        raise ConfigError("--regularizer attention_tuning is an alternative to --lora_enable / "
                          "--tune_mm_mlp_adapter (it decides itself which LLM weights train); drop one of them.")
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
            raise ConfigError(f"the distillation teacher {distill.distill_teacher} is a vision-language checkpoint "
                              "(the teacher defaults to --model_name_or_path); pass the original LLM with "
                              "--distill_teacher PATH.")
        if teacher.num_hidden_layers != cfg.num_hidden_layers:
            raise ConfigError(f"--distill_teacher {distill.distill_teacher} has {teacher.num_hidden_layers} layers, "
                              f"the model {cfg.num_hidden_layers}; the teacher must be the LLM the VLM was built from.")


def install(spec: UpstreamSpec, upstream, patches, configs: dict, names: list[str], monitor, monitor_items) -> None:
    """Rebind upstream's Trainer name (in `spec.train_module`) to the preserving subclass, filter the training-only
    heads out of its export helpers, carry distill's route field through its dataset; undone by `patches`."""
    from ..regularizers import DistillConfig
    if names:
        from ..adapters import ADAPTERS
        adapter = ADAPTERS[spec.adapter]()
        from ..attachment import without_heads
        from ..trainer import preserving_trainer_class
        patches.setattr(upstream, spec.trainer, preserving_trainer_class(getattr(upstream, spec.trainer), configs,
                                                                         adapter, scaling=spec.loss_scaling))
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
