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


def output_keeper(slot, seen: dict):
    """A forward hook keeping hidden_states/logits for the capture this forward created (`seen["capture"]`),
    so a later forward of the same step (a metrics pass, an eval) never mixes in."""
    def keep(module, args, output):
        cap = seen.get("capture")
        if cap is not None and cap is slot.capture:
            cap.take_outputs(output)
    return keep
