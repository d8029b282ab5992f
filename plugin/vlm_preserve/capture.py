"""The one data type between adapters and methods: what a training step exposed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class StepCapture:
    """Filled by an adapter during the model's forward; read by the regularizers.

    Shapes: `inputs_embeds` (B, L, d) as fed to the first decoder layer; `image_mask` and `attention_mask`
    (B, L) bool; `hidden_states` the model's tuple (embeddings, layer 0 output, ...) when requested;
    `visual_features` (N_visual, d_vision): vision-tower features at the image positions, in mask order;
    `input_ids` (B, L): the token id at each text position of `inputs_embeds` (-1 elsewhere), where the adapter
    can tell; `extra`: per-step additions (the distill term's keys/values and routing override).
    """
    inputs_embeds: Optional[torch.Tensor] = None
    input_ids: Optional[torch.Tensor] = None
    image_mask: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    visual_features: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    logits: Optional[torch.Tensor] = None
    step_seed: int = 0
    extra: dict = field(default_factory=dict)

    def take_outputs(self, output) -> None:
        """Keep hidden_states / logits from a module output (first one that has them wins); a bare tensor
        is the LM head's output, i.e. the logits."""
        if torch.is_tensor(output):
            output = {"logits": output}
        get = output.get if isinstance(output, dict) else (lambda k: getattr(output, k, None))
        if self.hidden_states is None and get("hidden_states") is not None:
            self.hidden_states = get("hidden_states")
        if self.logits is None and get("logits") is not None:
            self.logits = get("logits")

    @property
    def text_mask(self) -> torch.Tensor:
        return self.attention_mask & ~self.image_mask

    def text_embeds(self) -> torch.Tensor:
        return self.inputs_embeds[self.text_mask]

    def visual_embeds(self) -> torch.Tensor:
        return self.inputs_embeds[self.image_mask]


class CaptureSession:
    """Where an adapter's StepCapture of one training step lands, and the one rule every adapter follows: only the
    step's first forward is captured. Later forwards of the same step (TRL's metrics pass, an evaluation) and the
    recomputation of checkpointed layers in backward neither replace the capture nor add to it.

    An adapter calls `begin_forward()` where a model forward starts (a pre-hook, or its wrapped input preparation),
    collects into `scratch`, and calls `record(cap)` once it has built the capture; `capturing` tells its later
    hooks whether this forward is still the one to capture; `keep_outputs` is the forward hook that adds
    hidden_states / logits to the capture of this forward only."""

    def __init__(self):
        self.capture: StepCapture | None = None   # the step's capture, until the loss takes it
        self.scratch: dict = {}                   # what the forward in progress collected before its capture exists
        self.current: StepCapture | None = None   # the capture made by the forward in progress (None: not capturing)
        # The step's inputs as the trainer received them (set by the Trainer integration): for adapters whose hooks
        # see less than the trainer passed: PEFT calls the VLM's forward() directly, so only its inner model's hook
        # fires, and that one gets no labels; ms-swift's template hook on the PEFT wrapper has by then replaced
        # input_ids by inputs_embeds.
        self.batch: dict = {}
        self._open = False

    def begin_step(self) -> None:
        """Forget any capture: the next forward is the one the terms are computed from."""
        self.capture = None

    def take(self) -> StepCapture | None:
        cap, self.capture, self.batch = self.capture, None, {}
        return cap

    def begin_forward(self) -> bool:
        """A model forward starts: True where it is the one to capture (the step has no capture yet)."""
        self.scratch.clear()
        self.current = None
        self._open = self.capture is None
        return self._open

    @property
    def capturing(self) -> bool:
        """Is the forward in progress the one to capture, with its capture not yet recorded?"""
        return self._open and self.capture is None

    def record(self, cap: StepCapture) -> StepCapture:
        self.capture = self.current = cap
        self._open = False
        return cap

    def keep_outputs(self, module, args, output):
        """A forward hook: hidden_states / logits of the forward that made the step's capture, never a later one."""
        if self.current is not None and self.current is self.capture:
            self.current.take_outputs(output)
