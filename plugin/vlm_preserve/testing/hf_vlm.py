"""Tiny offline transformers-format VLM checkpoints, as LLaMA-Factory and ms-swift load them: a random Qwen2-VL or
LLaVA-hf model saved with its processor folder (a byte-level BPE tokenizer with the model's special tokens and
chat template, the image processor), the LLM it was built from (distill's teacher, same weights), and a small
chat dataset with generated images and text-only samples in both frameworks' formats.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .fixtures import sentence

KINDS = ("qwen2_vl", "llava")
_EOT = "<|endoftext|>"
_QWEN_SPECIAL = [_EOT, "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
_CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
           "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
           "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
           "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
           "{% endif %}")
_VICUNA = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: {% if message['content'] is string %}"
           "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
           "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% else %}ASSISTANT: "
           "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}</s>"
           "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)


@dataclass
class TinyHFVLM:
    root: Path
    kind: str
    model: Path       # the VLM + processor (what model_name_or_path / --model points at)
    llm: Path         # the LLM the VLM was built from (distill_teacher)
    images: Path
    records: list     # [{"messages": [...], "images": [abs paths]}], "<image>" tags matching the images

    def write_llamafactory(self) -> Path:
        """A LLaMA-Factory dataset_dir (sharegpt format) with two datasets: `tiny_mm` (every record) and
        `tiny_mm_images` (the records with an image); returns the folder."""
        d = self.root / "lf_data"
        d.mkdir(exist_ok=True)
        info = {}
        for name, records in (("tiny_mm", self.records), ("tiny_mm_images", [r for r in self.records if r["images"]])):
            (d / f"{name}.json").write_text(json.dumps(records, indent=1))
            info[name] = {"file_name": f"{name}.json", "formatting": "sharegpt",
                          "columns": {"messages": "messages", "images": "images"},
                          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                   "assistant_tag": "assistant"}}
        (d / "dataset_info.json").write_text(json.dumps(info, indent=1))
        return d

    def write_swift(self) -> Path:
        """An ms-swift jsonl dataset (messages + images); returns the file."""
        p = self.root / "swift_data.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        return p


def _tokenizer(rng: random.Random, special: list[str], eos: str, chat_template: str, extra_text: str,
               special_ids: dict | None = None):
    """`special_ids`: put these special tokens at these ids (ms-swift's Qwen2-VL template hard-codes Qwen's
    <|image_pad|> id 151655); the vocabulary is then sparse, the model's embedding sized to the largest id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([sentence(rng, 12) for _ in range(400)] + [extra_text] * 50,
                            trainers.BpeTrainer(vocab_size=600, special_tokens=[] if special_ids else special,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if special_ids:
        model = json.loads(tok.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tok.model = models.BPE(vocab={**model["vocab"], **special_ids}, merges=merges)
        tok.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=_EOT, unk_token=_EOT,
                                   additional_special_tokens=[s for s in special if s not in (_EOT, eos)])
    fast.chat_template = chat_template
    return fast


def _images_and_records(fx: TinyHFVLM, rng: random.Random, n_image: int, n_text: int) -> None:
    import numpy as np
    from PIL import Image

    for i in range(n_image):
        arr = np.zeros((32, 32, 3), dtype=np.uint8)
        arr[rng.randrange(16):, rng.randrange(16):] = [rng.randrange(256) for _ in range(3)]
        path = fx.images / f"img_{i:03d}.png"
        Image.fromarray(arr).save(path)
        fx.records.append({"messages": [{"role": "user", "content": f"<image>{sentence(rng, rng.randint(3, 7))}"},
                                        {"role": "assistant", "content": sentence(rng, rng.randint(3, 9))}],
                           "images": [str(path)]})
    for _ in range(n_text):
        fx.records.append({"messages": [{"role": "user", "content": sentence(rng, rng.randint(4, 8))},
                                        {"role": "assistant", "content": sentence(rng, rng.randint(6, 12))}],
                           "images": []})
    rng.shuffle(fx.records)


QWEN_IDS = {_EOT: 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}


def build_tiny_hf_vlm(root: str | os.PathLike, kind: str = "qwen2_vl", *, seed: int = 0, n_image: int = 12,
                      n_text: int = 6, qwen_ids: bool = False) -> TinyHFVLM:
    """Write the fixture under `root` (created) and return its paths. `qwen_ids`: Qwen2-VL's special tokens at
    Qwen's own ids (ms-swift's template needs them; the embedding then has 151,657 rows)."""
    import torch
    import transformers as T

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    root = Path(root)
    fx = TinyHFVLM(root, kind, root / kind, root / f"{kind}_llm", root / "images", [])
    for p in (fx.model, fx.llm, fx.images):
        p.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if kind == "qwen2_vl":
        tok = _tokenizer(rng, _QWEN_SPECIAL, "<|im_end|>", _CHATML, "system user assistant",
                         QWEN_IDS if qwen_ids else None)
        ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
               ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
               ("vision_end_token_id", "<|vision_end|>"))}
        text = dict(TEXT, vocab_size=max(tok.get_vocab().values()) + 1, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, out_hidden_size=32, intermediate_size=48,
                      spatial_merge_size=2, patch_size=4, temporal_patch_size=2, in_chans=3)
        model = T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
        pixels = dict(min_pixels=16 * 16, max_pixels=32 * 32)
        image_processor = T.Qwen2VLImageProcessor(patch_size=4, temporal_patch_size=2, merge_size=2, **pixels)
        video_processor = T.Qwen2VLVideoProcessor(patch_size=4, temporal_patch_size=2, merge_size=2, **pixels)
        processor = T.Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                                       video_processor=video_processor, chat_template=_CHATML)
        llm = T.Qwen2ForCausalLM(T.Qwen2Config(**{k: v for k, v in text.items() if k != "rope_scaling"}))
    else:
        tok = _tokenizer(rng, [_EOT, "</s>", "<image>"], "</s>", _VICUNA, "USER: ASSISTANT:")
        text = T.LlamaConfig(**dict(TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id))
        vision = T.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=32, patch_size=8)
        model = T.LlavaForConditionalGeneration(T.LlavaConfig(text_config=text, vision_config=vision,
                                                              image_token_id=tok.convert_tokens_to_ids("<image>")))
        image_processor = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = T.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                     vision_feature_select_strategy="default", image_token="<image>",
                                     num_additional_image_tokens=1, chat_template=_VICUNA)
        llm = T.LlamaForCausalLM(text)
    # the LLM the VLM was "built from": the same decoder and head weights, so distill starts at zero
    lm_state = {k: v for k, v in model.state_dict().items()}
    own = llm.state_dict()
    for k in own:
        for src in (f"model.language_model.{k[len('model.'):]}" if k.startswith("model.") else k, k):
            if src in lm_state and lm_state[src].shape == own[k].shape:
                own[k] = lm_state[src]
                break
    llm.load_state_dict(own)
    model.save_pretrained(fx.model)
    processor.save_pretrained(fx.model)
    llm.save_pretrained(fx.llm)
    tok.save_pretrained(fx.llm)
    _images_and_records(fx, rng, n_image, n_text)
    return fx
