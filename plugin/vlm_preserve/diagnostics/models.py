"""Open a checkpoint for the diagnostics: the model, its adapter, and a model input per sample built the
way that upstream builds it. Two kinds, told apart by `model_type` in config.json:

- upstream LLaVA (`llava_llama`, `llava_mistral`, `llava_mpt`, as upstream `train()` saves them): loaded
  with upstream's classes; a sample goes through upstream's own `LazySupervisedDataset` (conversation
  template, image preprocessing, image token), so the input is exactly what training saw.
- transformers-native VLMs (`llava`, `llava_next`, `llava_onevision`, `qwen2_vl`, `qwen2_5_vl`): loaded with
  `AutoModelForImageTextToText` and `AutoProcessor`; the conversation goes through the processor's chat
  template (or, without one, "USER: … ASSISTANT: …" lines).

Any other model: build batches yourself and call `vlm_preserve.diagnostics.collect` with its adapter
(e.g. a `GenericAdapter`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..patching import Patches
from .samples import Sample, SampleError

UPSTREAM_LLAVA_TYPES = ("llava_llama", "llava_mistral", "llava_mpt")
IMAGE_PLACEHOLDER = "<image>"  # LLaVA data json's image token


def model_type(path: str | Path) -> str:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise SampleError(f"--model {path}: no config.json there; give a checkpoint directory saved with "
                          "save_pretrained (upstream LLaVA's train() output or a transformers VLM).")
    return json.loads(cfg.read_text()).get("model_type", "")


def open_checkpoint(path: str | Path, data: str | Path, image_folder, *, device="cpu", dtype=torch.float32,
                    conv_template: str = "v1"):
    kind = model_type(path)
    if kind in UPSTREAM_LLAVA_TYPES:
        return UpstreamLlava(path, data, image_folder, device=device, dtype=dtype, conv_template=conv_template)
    return TransformersNative(path, device=device, dtype=dtype)


class UpstreamLlava:
    def __init__(self, path, data, image_folder, *, device, dtype, conv_template):
        try:
            import llava.model  # noqa: F401  (registers llava_llama & co. with the transformers Auto classes)
            from llava import conversation as conversation_lib
            from llava.train.train import DataArguments, LazySupervisedDataset
        except ImportError as e:
            raise ImportError(f"--model {path} is an upstream LLaVA checkpoint; install upstream LLaVA: "
                              "pip install --no-deps llava-torch==1.2.2.post1 (see third_party/llava).") from e
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..adapters import LlavaAdapter

        if conv_template not in conversation_lib.conv_templates:
            raise SampleError(f"--conv-template {conv_template!r} is not one of upstream LLaVA's templates: "
                              f"{', '.join(sorted(conversation_lib.conv_templates))}.")
        self.adapter = LlavaAdapter()
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
        tower = model.get_vision_tower()
        if not tower.is_loaded:  # upstream keeps the (frozen) tower's weights at mm_vision_tower, not here
            tower.load_model()
        self.model = model.to(device=device, dtype=dtype).eval()
        cfg = model.config
        tok = AutoTokenizer.from_pretrained(path, use_fast=False)
        tok.model_max_length = getattr(cfg, "tokenizer_model_max_length", None) or 2048
        aspect = getattr(cfg, "image_aspect_ratio", None) or "square"
        args = DataArguments(data_path=str(data), lazy_preprocess=True, is_multimodal=True,
                             image_folder=str(image_folder or Path(data).parent), image_aspect_ratio=aspect)
        args.image_processor = tower.image_processor
        args.mm_use_im_start_end = bool(getattr(cfg, "mm_use_im_start_end", False))
        self.dataset = LazySupervisedDataset(str(data), tok, args)
        self.template = conversation_lib.conv_templates[conv_template]
        self._conversation_lib = conversation_lib
        self.geometry = "pad" if aspect == "pad" else "crop"
        self.device, self.dtype = device, dtype

    def batch(self, sample: Sample) -> dict:
        with Patches() as p:  # upstream reads the template from a module global
            p.setattr(self._conversation_lib, "default_conversation", self.template)
            item = self.dataset[sample.index]
        ids = item["input_ids"][None].to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
                "images": item["image"][None].to(self.device, self.dtype)}


class TransformersNative:
    def __init__(self, path, *, device, dtype):
        import transformers
        from transformers import AutoProcessor

        from ..adapters import TransformersAdapter
        from ..compat import dtype_kwarg
        from ..adapters.transformers_native import SUPPORTED

        cls = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        model = cls.from_pretrained(path, **dtype_kwarg(dtype))
        if not TransformersAdapter.matches(model):
            raise SampleError(f"--model {path}: {type(model).__name__} is not one the diagnostics can open "
                              f"({', '.join(SUPPORTED)}, or upstream LLaVA checkpoints).")
        self.adapter = TransformersAdapter()
        self.model = model.to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        ip = getattr(self.processor, "image_processor", None)
        self.geometry = "crop" if getattr(ip, "do_center_crop", False) else "resize"
        self.device = device

    def prompt(self, conversations: list) -> str:
        image_token = getattr(self.processor, "image_token", IMAGE_PLACEHOLDER)
        if getattr(self.processor, "chat_template", None):
            messages = []
            for turn in conversations:
                text = turn["value"]
                content = [{"type": "image"}] if IMAGE_PLACEHOLDER in text else []
                content.append({"type": "text", "text": text.replace(IMAGE_PLACEHOLDER, "").strip()})
                messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
            return self.processor.apply_chat_template(messages, tokenize=False)
        lines = [("USER: " if t["from"] == "human" else "ASSISTANT: ") + t["value"] for t in conversations]
        return " ".join(lines).replace(IMAGE_PLACEHOLDER, image_token)

    def batch(self, sample: Sample) -> dict:
        from PIL import Image

        turns = [dict(t) for t in sample.record.get("conversations") or [{"from": "human", "value": ""}]]
        if not any(IMAGE_PLACEHOLDER in t["value"] for t in turns):  # as upstream LLaVA: the image leads
            turns[0]["value"] = IMAGE_PLACEHOLDER + "\n" + turns[0]["value"]
        text = self.prompt(turns)
        image = Image.open(sample.image).convert("RGB")
        inputs = self.processor(images=[image], text=[text], return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if torch.is_floating_point(v) else v.to(self.device))
                for k, v in inputs.items()}
