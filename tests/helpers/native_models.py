"""Tiny random transformers-native VLMs built offline from configs, and batches placing image tokens the
way the processors do (one token per visual feature, counted from the model's own get_image_features)."""
import torch

KINDS = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl",
         "idefics3", "smolvlm", "paligemma")
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IDEFICS = ("idefics3", "smolvlm")
IMG, VID, VSTART, VEND, PAD = 299, 298, 297, 296, 0
TEXT = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def build(kind: str, seed: int = 0):
    import transformers as T
    torch.manual_seed(seed)
    if kind == "llava":
        cfg = T.LlavaConfig(text_config=T.LlamaConfig(**TEXT), vision_config=T.CLIPVisionConfig(**VISION),
                            image_token_id=IMG)
        return T.LlavaForConditionalGeneration(cfg)
    if kind == "llava_next":
        cfg = T.LlavaNextConfig(text_config=T.LlamaConfig(**TEXT), vision_config=T.CLIPVisionConfig(**VISION),
                                image_token_id=IMG, image_grid_pinpoints=PINPOINTS)
        return T.LlavaNextForConditionalGeneration(cfg)
    if kind == "llava_onevision":
        cfg = T.LlavaOnevisionConfig(text_config=T.Qwen2Config(**TEXT), vision_config=T.SiglipVisionConfig(**VISION),
                                     image_token_id=IMG, video_token_id=VID, image_grid_pinpoints=PINPOINTS)
        return T.LlavaOnevisionForConditionalGeneration(cfg)
    if kind == "gemma3":  # a sliding and a global layer each, as the real ones alternate (5:1)
        text = T.Gemma3TextConfig(**TEXT, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
        cfg = T.Gemma3Config(text_config=text, vision_config=T.SiglipVisionConfig(**VISION), mm_tokens_per_image=4,
                             image_token_index=IMG, boi_token_index=VSTART, eoi_token_index=VEND)
        model = T.Gemma3ForConditionalGeneration(cfg)
        with torch.no_grad():  # initialised to zeros: every image would enter as the zero vector
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
        return model
    if kind == "internvl":
        vision = T.InternVLVisionConfig(**dict(VISION, image_size=[32, 32], patch_size=[8, 8]))
        cfg = T.InternVLConfig(text_config=T.Qwen2Config(**TEXT), vision_config=vision, image_token_id=IMG)
        return T.InternVLForConditionalGeneration(cfg)
    if kind == "idefics3":
        cfg = T.Idefics3Config(text_config=T.LlamaConfig(**TEXT), vision_config=T.Idefics3VisionConfig(**VISION),
                               image_token_id=IMG, scale_factor=2)
        return T.Idefics3ForConditionalGeneration(cfg)
    if kind == "smolvlm":
        cfg = T.SmolVLMConfig(text_config=T.LlamaConfig(**TEXT), vision_config=T.SmolVLMVisionConfig(**VISION),
                              image_token_id=IMG, scale_factor=2)
        return T.SmolVLMForConditionalGeneration(cfg)
    if kind == "paligemma":
        d = TEXT["hidden_size"]
        cfg = T.PaliGemmaConfig(text_config=T.GemmaConfig(**TEXT, head_dim=8),
                                vision_config=T.SiglipVisionConfig(**VISION), image_token_index=IMG,
                                projection_dim=d, hidden_size=d)
        return T.PaliGemmaForConditionalGeneration(cfg)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if kind == "qwen3_vl":  # deepstack: two vision layers' features are added after LLM layers 0 and 1
        text = dict(TEXT, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 1, 1], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, num_heads=4, out_hidden_size=32, intermediate_size=48,
                      spatial_merge_size=2, patch_size=4, temporal_patch_size=2, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 1])
        return T.Qwen3VLForConditionalGeneration(T.Qwen3VLConfig(text_config=text, vision_config=vision, **ids))
    text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, out_hidden_size=32, intermediate_size=48,
                  spatial_merge_size=2, patch_size=4, temporal_patch_size=2, in_chans=3)
    if kind == "qwen2_vl":
        return T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    if kind == "qwen2_5_vl":
        vision = dict(vision, fullatt_block_indexes=[1], window_size=16)
        return T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    raise ValueError(kind)


TILES = (2, 1)  # InternVL: image 0 tiled in two, image 1 one tile (the processor's dynamic tiling)
SUBS = (3, 1)  # Idefics3/SmolVLM: image 0 split in 2 crops + the global image, image 1 not split


def _images(kind: str, n: int, g):
    if kind in ("llava", "gemma3", "paligemma"):
        return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}
    if kind in ("llava_next", "llava_onevision"):
        sizes = torch.tensor([[32, 64], [64, 32], [32, 32]][:n] * (n // 3 + 1))[:n]
        return {"pixel_values": torch.randn(n, 3, 3, 32, 32, generator=g), "image_sizes": sizes}
    if kind == "internvl":
        return {"pixel_values": torch.randn(sum(TILES[i % 2] for i in range(n)), 3, 32, 32, generator=g)}
    if kind in IDEFICS:  # (images, sub-images, ...), zero-padded; image 1 is 24 pixels wide, padded to 32
        pixels, mask = torch.zeros(n, max(SUBS), 3, 32, 32), torch.zeros(n, max(SUBS), 32, 32, dtype=torch.bool)
        for i in range(n):
            width = 32 if i % 2 == 0 else 24
            pixels[i, :SUBS[i % 2], :, :, :width] = torch.randn(SUBS[i % 2], 3, 32, width, generator=g)
            mask[i, :SUBS[i % 2], :, :width] = True
        return {"pixel_values": pixels, "pixel_attention_mask": mask}
    grid = torch.tensor([[1, 4, 4]] * n)
    return {"pixel_values": torch.randn(n * 16, 3 * 2 * 4 * 4, generator=g), "image_grid_thw": grid}


def _one(kind: str, images: dict, i: int) -> dict:
    """Image i's inputs out of `_images`."""
    if kind in QWEN:
        return {"pixel_values": images["pixel_values"][16 * i:16 * (i + 1)],
                "image_grid_thw": images["image_grid_thw"][i:i + 1]}
    if kind == "internvl":
        start = sum(TILES[j % 2] for j in range(i))
        return {"pixel_values": images["pixel_values"][start:start + TILES[i % 2]]}
    return {k: v[i:i + 1] for k, v in images.items()}


def _image_tokens(kind: str, i: int, count: int) -> list:
    """The ids the processor puts for image i, whose features are `count` tokens."""
    img = [IMG] * count
    if kind in QWEN + ("gemma3", "internvl"):  # <|vision_start|>..<|vision_end|>, <start_of_image>.., <img>..</img>
        return [VSTART] + img + [VEND]
    if kind in IDEFICS:  # per sub-image <fake_token_around_image><row_r_col_c> (or <global-img>), then a closing one
        per = count // SUBS[i % 2]
        return sum(([VSTART, 5 + s] + [IMG] * per for s in range(SUBS[i % 2])), []) + [VSTART]
    return img


def image_features(model, kind: str, images: dict) -> torch.Tensor:
    """What the model inserts for these images, from its own get_image_features: (n_tokens, d)."""
    with torch.no_grad():
        out = model.model.get_image_features(**images)
    feats = getattr(out, "pooler_output", out)
    return torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])


def make_batch(model, kind: str, *, text_only: bool = False, seed: int = 0, batch: int = 3) -> dict:
    """`batch` samples: with images, sample 0 gets one image, sample 1 none (text-only), sample 2 one image;
    right padding; labels -100 at image and padding positions. Each image's tokens are laid out as its model's
    processor does (`_image_tokens`), with the extra inputs that processor returns (token type ids, Idefics3's
    per-sample image rows and pixel_attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    has_image = [False] * batch if text_only else [i % 2 == 0 for i in range(batch)]
    n_img = sum(has_image)
    images = _images(kind, n_img, g) if n_img else {}
    counts = [image_features(model, kind, _one(kind, images, i)).shape[0] for i in range(n_img)]
    rows, k, suffix = [], 0, []
    for b in range(batch):
        pre = torch.randint(5, 290, (3 + b,), generator=g).tolist()
        post = torch.randint(5, 290, (6 + 2 * b,), generator=g).tolist()
        mid = []
        if has_image[b]:
            mid = _image_tokens(kind, k, counts[k])
            k += 1
        # PaliGemma: the image first, then the prompt; `post` is the suffix (token type 1)
        rows.append(mid + pre + post if kind == "paligemma" else pre + mid + post)
        suffix.append(len(post))
    L = max(map(len, rows))
    ids = torch.full((batch, L), PAD)
    attn = torch.zeros(batch, L, dtype=torch.long)
    token_type = torch.zeros(batch, L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        attn[b, :len(r)] = 1
        token_type[b, len(r) - suffix[b]:len(r)] = 1
    labels = ids.clone()
    labels[(ids == IMG) | (attn == 0)] = -100
    if kind in IDEFICS and n_img:  # the processor's layout: one row of images per sample, zeros where none
        rows_of = [i for i, h in enumerate(has_image) if h]
        images = {k: torch.zeros(batch, *v.shape[1:], dtype=v.dtype).index_copy_(0, torch.tensor(rows_of), v)
                  for k, v in images.items()}
    out = {"input_ids": ids, "attention_mask": attn, "labels": labels, **images}
    if kind in QWEN and n_img:  # the processor's modality ids, which M-RoPE needs
        out["mm_token_type_ids"] = (ids == IMG).long()
    if kind == "gemma3":  # image tokens attend to each other bidirectionally
        out["token_type_ids"] = (ids == IMG).long()
    if kind == "paligemma":  # prefix (image and prompt) bidirectional, suffix causal
        out["token_type_ids"] = token_type
    return out


def save_llava_checkpoint(path, seed: int = 0):
    """A tiny LlavaForConditionalGeneration checkpoint with its processor (word-level tokenizer whose
    `<image>` the processor expands to the 4x4 patch grid), as `from_pretrained` directories are."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vlm_preserve.testing.fixtures import WORDS

    words = ["[UNK]", "[PAD]", "<image>"] + sorted(set(WORDS) | {"USER:", "ASSISTANT:", "It", "What", "colour"})
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                    additional_special_tokens=["<image>"])
    image_processor = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = T.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=VISION["patch_size"],
                                 vision_feature_select_strategy="default", image_token="<image>",
                                 num_additional_image_tokens=1)  # CLIP's CLS, dropped by the "default" strategy
    torch.manual_seed(seed)
    cfg = T.LlavaConfig(text_config=T.LlamaConfig(**dict(TEXT, vocab_size=len(words), pad_token_id=1)),
                        vision_config=T.CLIPVisionConfig(**VISION), image_token_id=words.index("<image>"))
    T.LlavaForConditionalGeneration(cfg).save_pretrained(path)
    processor.save_pretrained(path)
    return path


class Batches(torch.utils.data.Dataset):
    """Whole pre-built batches (the image-token counts differ per model), one per item."""
    def __init__(self, model, kind, n=4):
        self.items = [make_batch(model, kind, seed=i, text_only=(i == 3)) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def trainer_for(model, kind, out, cls=None, **kw):
    """A CPU Trainer over `Batches` of `model` (extra keywords: a few TrainingArguments, then the Trainer's)."""
    import transformers as T

    args = T.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=1, max_steps=kw.pop("max_steps", 4), logging_steps=1,
        learning_rate=1e-3, save_strategy=kw.pop("save_strategy", "no"), save_steps=kw.pop("save_steps", 2),
        report_to="none", use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True,
        gradient_accumulation_steps=kw.pop("gradient_accumulation_steps", 1))
    return (cls or T.Trainer)(model=model, args=args, train_dataset=Batches(model, kind),
                                         data_collator=lambda xs: xs[0], **kw)


def rows(trainer, after=0):
    return [r for r in trainer.state.log_history if "loss" in r and r["step"] > after]


def teacher_of(vlm, noise: float = 0.0, seed: int = 1):
    """A CausalLM holding the VLM's language model weights (optionally perturbed: a teacher that disagrees)."""
    import transformers as T

    from vlm_preserve.adapters.transformers_native import language_model
    t = T.AutoModelForCausalLM.from_config(vlm.config.text_config)
    t.model.load_state_dict(language_model(vlm).state_dict())
    t.lm_head.load_state_dict(vlm.lm_head.state_dict())
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in t.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return t


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def word_tokenizer(template=True):
    """A word-level tokenizer over the fixture's words (ids < the native helpers' vocab of 300), BOS `<s>`,
    optionally a ChatML template."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vlm_preserve.testing.fixtures import WORDS
    words = ["[UNK]", "[PAD]", "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "User:", "Assistant:",
             "and", "it", "squares", "are"] + sorted(set(WORDS))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                    additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if template:
        tok.chat_template = CHATML
    return tok
