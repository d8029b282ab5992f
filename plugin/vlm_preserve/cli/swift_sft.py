"""ms-swift: `swift sft` with the plugin's terms, through ms-swift's own plugin mechanism.

    VLM_PRESERVE="--regularizer rdd,pre --rdd_weight 0.5" \\
        swift sft <your flags> --external_plugins "$(vlm-preserve swift-plugin)"
    swift-sft <your swift sft flags> --regularizer rdd,pre --rdd_weight 0.5      # the same, in one command

`--external_plugins FILE` is imported while ms-swift parses its arguments, before it builds the model and the
trainer; our file registers the preserving subclass of ms-swift's SFT trainer as TrainerFactory's `causal_lm`
trainer (terms after its `compute_loss`, logged by name into `logging.jsonl`, heads checkpointed and dropped from
every save). ms-swift refuses flags it does not know and its parser has no extension point, so the plugin's
options travel in the VLM_PRESERVE environment variable, in llava-train's flag syntax (inherited by the process
`swift sft` starts, by torchrun's workers and by dataloader workers). `swift-sft` is a launcher for that alone:
it moves the plugin's flags into VLM_PRESERVE, adds `--external_plugins`, and runs `swift sft`.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ENV = "VLM_PRESERVE"
COMMAND = "swift-sft"
TASK = "causal_lm"  # the TrainerFactory key `swift sft` builds its trainer from
# distill and soft_label read the logits and labels of every response position; ms-swift's logits_to_keep (its
# default for multimodal models on transformers 5) computes the logits of a suffix only and cuts the labels to it
FULL_LOGITS = ("distill", "soft_label")


def plugin_path() -> str:
    return str(Path(__file__).resolve().parents[1] / "swift_plugin" / "vlm_preserve_swift.py")


def _parser():
    from .launch import options_parser
    return options_parser(COMMAND, "ms-swift's `swift sft` with vlm-preserve regularizers. Every other flag goes to "
                                   f"swift sft unchanged. Or: {ENV}='<these flags>' swift sft ... --external_plugins "
                                   "\"$(vlm-preserve swift-plugin)\".")


def register(environ=os.environ) -> list[str]:
    """What the plugin file runs: read VLM_PRESERVE and, where it enables anything, make ms-swift's SFT trainer the
    preserving one. Returns the enabled methods (none: ms-swift is left as it is). Safe to run again (ms-swift
    re-imports plugins in dataloader workers)."""
    from .launch import parse_options
    configs, monitor, names, items, rest = parse_options(_parser(), shlex.split(environ.get(ENV, "")))
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


def split_flags(argv: list[str], names: set) -> tuple[list[str], list[str]]:
    """(the flags in `names` with their values, everything else in order): `--name value` or `--name=value`."""
    ours, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and a[2:].split("=", 1)[0] in names:
            take = 1 if "=" in a or i + 1 == len(argv) or argv[i + 1].startswith("--") else 2
            ours += argv[i:i + take]
            i += take
        else:
            rest.append(a)
            i += 1
    return ours, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        print("\nms-swift's own flags: swift sft --help")
        return 0
    from ..config import ConfigError
    from .launch import option_names, parse_options
    ours, rest = split_flags(argv, set(option_names()))
    try:  # bad options fail here, before ms-swift starts
        _, _, names, items, _ = parse_options(_parser(), ours)
    except ConfigError as e:
        print(f"{COMMAND}: error: {e}", file=sys.stderr)
        return 2
    import importlib.util
    if importlib.util.find_spec("swift") is None:
        print(f"{COMMAND}: error: ms-swift is not installed in this Python ({sys.executable}): pip install "
              "ms-swift==4.5.3 (the tested version).", file=sys.stderr)
        return 2
    env = dict(os.environ, **{ENV: shlex.join(ours)})
    import subprocess
    # `swift sft` itself (its console script's module), by this interpreter: the `swift` on PATH may be another's
    cmd = [sys.executable, "-m", "swift.cli.main", "sft", *rest]
    cmd += ["--external_plugins", plugin_path()] if names or items else []
    return subprocess.run(cmd, env=env).returncode


def entry() -> None:
    sys.exit(main())
