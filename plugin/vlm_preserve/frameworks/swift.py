"""ms-swift (pip ms-swift): `swift sft` with the plugin's terms, through ms-swift's own plugin mechanism.

`--external_plugins FILE` is imported while ms-swift parses its arguments, before it builds the model and the
trainer; our file (swift_plugin/vlm_preserve_swift.py, beside this one) calls `register()`, which makes the
preserving subclass of ms-swift's SFT trainer TrainerFactory's `causal_lm` trainer: the terms are added after its
`compute_loss`, batches are captured by the transformers-native adapter, the terms are logged by name into
`logging.jsonl`, and the heads are checkpointed and dropped from every save. ms-swift refuses flags it does not
know and its parser has no extension point, so the plugin's options travel in the VLM_PRESERVE environment
variable, in llava-train's flag syntax. `swift-sft` (cli/swift_sft.py) is a launcher for that alone.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

ENV = "VLM_PRESERVE"
TASK = "causal_lm"  # the TrainerFactory key `swift sft` builds its trainer from
# distill, soft_label and dft read the logits and labels of every response position; ms-swift's logits_to_keep (its
# default for multimodal models on transformers 5) computes the logits of a suffix only and cuts the labels to it
FULL_LOGITS = ("distill", "soft_label", "dft")


def plugin_path() -> str:
    return str(Path(__file__).resolve().parent / "swift_plugin" / "vlm_preserve_swift.py")


def register(environ=os.environ) -> list[str]:
    """What the plugin file runs: read VLM_PRESERVE and, where it enables anything, make ms-swift's SFT trainer the
    preserving one. Returns the enabled methods (none: ms-swift is left as it is). Safe to run again (ms-swift
    re-imports plugins in dataloader workers)."""
    from ..options import options_parser, parse_options
    configs, monitor, names, items, rest = parse_options(options_parser(ENV, "vlm-preserve's flags for swift sft"),
                                                         shlex.split(environ.get(ENV, "")))
    if rest:
        from ..config import ConfigError
        raise ConfigError(f"{ENV} holds {rest}, which are not vlm-preserve flags; ms-swift's own flags go on its "
                          "command line.")
    if not names and not items:
        return []
    from swift.trainers import Seq2SeqTrainer, TrainerFactory

    from ..monitor import monitored_trainer_class
    from ..trainer import preserving_trainer_class
    cls = preserving_trainer_class(Seq2SeqTrainer, configs) if names else Seq2SeqTrainer
    if items:
        cls = monitored_trainer_class(cls, monitor, items)
    full_logits = bool(set(names) & set(FULL_LOGITS))

    def get_use_logits_to_keep(self, default_value: bool = True):
        if full_logits and self.args.use_logits_to_keep is not False:
            print(f"[vlm-preserve] use_logits_to_keep: False ({', '.join(sorted(set(names) & set(FULL_LOGITS)))} "
                  "reads the logits of every response position)", flush=True)
            self.args.use_logits_to_keep = False
        return cls.get_use_logits_to_keep(self, default_value)

    global PreservingSeq2SeqTrainer
    PreservingSeq2SeqTrainer = type("PreservingSeq2SeqTrainer", (cls,),
                                    {"get_use_logits_to_keep": get_use_logits_to_keep,
                                     "__module__": __name__})
    TrainerFactory.TRAINER_MAPPING[TASK] = f"{__name__}.PreservingSeq2SeqTrainer"
    return names
