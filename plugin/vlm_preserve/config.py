"""Shared bits of the config dataclasses. Each method's own fields live in its file under regularizers/;
the CLI flags are generated from those dataclasses (transformers' HfArgumentParser), so a name,
default or help text is defined once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


# The label value upstream LLaVA/Bunny/NVILA and transformers all skip in the LM loss (check-upstream verifies it).
IGNORE_INDEX = -100
# The plugin's training-only heads: their parameter prefix in the model and their file in a checkpoint folder.
HEADS_PREFIX = "vlm_preserve_heads"
HEADS_FILE = HEADS_PREFIX + ".safetensors"


class ConfigError(ValueError):
    """Bad user input: the message says what was wrong, what was expected, and what to do."""


def choice(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value!r} is not one of: {', '.join(choices)}.")


NONFINITE = ("skip", "raise")


class NonFiniteTermError(FloatingPointError):
    """A regularizer term was NaN or infinite at a step and `--nonfinite_terms raise` was given."""


@dataclass
class PreserveArguments:
    regularizer: str = field(default="none", metadata={
        "help": "Comma-separated preservation methods (e.g. rdd,pre); none = upstream as is."})
    nonfinite_terms: str = field(default="skip", metadata={
        "help": "A term that is NaN or infinite at a step (on any rank): skip = it enters with weight 0 for that "
                "step, so only the LM loss trains it (logged as <term>_skipped_steps); raise = stop with "
                "NonFiniteTermError naming the term."})


@dataclass(frozen=True)
class LossScaling:
    """What a host trainer does to the loss its `compute_loss` returns, declared by whoever knows the host (a
    launcher's UpstreamSpec), so the terms weigh the same under every host and gradient accumulation.

    divides_by_ga: True: the trainer divides the loss by the gradient-accumulation steps (transformers' Trainer
    when the model does not normalise over the accumulated batch itself); False: it does not; None: decide as
    transformers does (from `num_items_in_batch`, `model_accepts_loss_kwargs`, `compute_loss_func`).
    times_world_size: the trainer multiplies the loss by the world size (NVILA's training_step)."""
    divides_by_ga: Optional[bool] = None
    times_world_size: bool = False
