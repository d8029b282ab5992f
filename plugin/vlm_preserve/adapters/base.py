"""The contract of an adapter: where a VLM keeps its language model, projector and decoder layers, and how one
training forward is turned into a StepCapture. An adapter never computes a loss.

To support another codebase or model family, subclass `Adapter` in `adapters/<name>.py`, implement the abstract
methods, and add the class to `adapters.ADAPTERS` (or pass an instance as `attach(..., adapter=...)`).
"""
from __future__ import annotations

from ..capture import CaptureSession
from ..patching import Patches


class Adapter:
    name = ""

    @classmethod
    def matches(cls, model) -> bool:
        """Is `model` (or a module inside it: PEFT, DeepSpeed and DDP wrap it) one this adapter serves?"""
        return False

    def model_dims(self, model) -> dict:
        """{"num_layers", "hidden_size", "vision_hidden_size" (None where unknown)} of the language model."""
        raise NotImplementedError

    def decoder_layers(self, model):
        """The language model's decoder layers (a ModuleList)."""
        raise NotImplementedError

    def llm_modules(self, model) -> list:
        """The language model's modules, embedding first (its parameters give the training dtype and device)."""
        raise NotImplementedError

    def projector_modules(self, model) -> list:
        raise NotImplementedError

    def check_distill(self, model) -> None:
        """Raise ConfigError where a text-only teacher cannot follow this model (distill); the default allows it."""

    def install_capture(self, model, session: CaptureSession, *, visual_features: bool = False) -> Patches:
        """Hook the model so each forward that `session` says to capture records a StepCapture; returns the
        patches that undo it. `visual_features`: also fill `StepCapture.visual_features` (PRe's pre_proj)."""
        raise NotImplementedError
