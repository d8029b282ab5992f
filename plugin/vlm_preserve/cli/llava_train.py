"""`llava-train`: upstream LLaVA's own `train()` with the plugin's flags added.

    llava-train <the upstream flags you already pass> --regularizer rdd,pre [--rdd_weight 1.0 ...]

Our flags are parsed (and validated, before any model loads) with the same HfArgumentParser dialect
upstream uses; the rest of the command line goes to upstream `train()` untouched. With
`--regularizer none` (the default) nothing is patched: the run is plain upstream.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Optional

LLAVA_INSTALL = ("upstream LLaVA is not installed. Install the pinned version with:\n"
                 "  pip install --no-deps llava-torch==1.2.2.post1\n"
                 "  pip install -r third_party/llava/requirements.txt   (see third_party/llava/README.md)")


@dataclass
class LlavaLaunchArguments:
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "Passed to upstream train(attn_implementation=...); flash_attention_2 = upstream's train_mem.py."})


def _parser():
    from transformers import HfArgumentParser

    from ..regularizers import CONFIG_CLASSES
    return HfArgumentParser(CONFIG_CLASSES + (LlavaLaunchArguments,), allow_abbrev=False,
                            prog="llava-train",
                            description="Upstream LLaVA train() with vlm-preserve regularizers. "
                                        "Every flag not listed here goes to upstream unchanged.")


def given_flags(argv: list[str], names) -> set[str]:
    flags = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    return flags & set(names)


def _fail(msg: str, code: int = 2):
    print(f"llava-train: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def preflight(configs: dict, names: list[str], upstream_argv: list[str]):
    """Everything checkable before a model loads: upstream's own flags, flag combinations, layer range."""
    import transformers
    from llava.train import train as upstream

    from ..regularizers import PReConfig
    parser = transformers.HfArgumentParser((upstream.ModelArguments, upstream.DataArguments, upstream.TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=upstream_argv)
    if not names:
        return
    if model_args.vision_tower is None:
        _fail(f"--regularizer {','.join(names)} needs a vision tower (--vision_tower); without one upstream "
              "trains a plain language model and there is nothing to regularize.")
    if "attention_tuning" in names and (training_args.lora_enable or model_args.tune_mm_mlp_adapter):
        _fail("--regularizer attention_tuning is an alternative to --lora_enable / --tune_mm_mlp_adapter "
              "(it decides itself which LLM weights train); drop one of them.")
    if "pre" in names:
        import llava.model  # noqa: F401  registers llava_llama with AutoConfig
        cfg = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path)
        configs[PReConfig].layer_index(cfg.num_hidden_layers)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..config import ConfigError
    from ..regularizers import CONFIG_CLASSES, validate

    parser = _parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nUpstream flags (ModelArguments, DataArguments, TrainingArguments) are documented by upstream "
              "LLaVA: python -m llava.train.train --help")
        return
    *cfgs, launch, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    configs = {type(c): c for c in cfgs}
    names_all = [f.name for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)]
    try:
        names = validate(configs, given_flags(argv, names_all))
    except ConfigError as e:
        _fail(str(e))
    try:
        from llava.train import train as upstream
    except ImportError:
        _fail(LLAVA_INSTALL)
    try:
        preflight(configs, names, rest)
    except ConfigError as e:
        _fail(str(e))

    from ..patching import Patches
    with Patches() as patches:
        if names:
            from ..adapters import llava as adapter
            from ..attachment import without_heads
            from ..trainer import preserving_trainer_class
            patches.setattr(upstream, "LLaVATrainer", preserving_trainer_class(upstream.LLaVATrainer, configs, adapter))
            adapter.allow_numpy_rng_state(patches)
            for fn in ("get_peft_state_maybe_zero_3", "get_peft_state_non_lora_maybe_zero_3"):
                original = getattr(upstream, fn)
                patches.setattr(upstream, fn, lambda *a, _f=original, **k: without_heads(_f(*a, **k)))
        old_argv = sys.argv
        sys.argv = [old_argv[0] if old_argv else "llava-train"] + rest
        try:
            upstream.train(attn_implementation=launch.attn_implementation)
        finally:
            sys.argv = old_argv


if __name__ == "__main__":
    main()
