"""Build an upstream LLaVA model and a real collated batch from the tiny fixture, the way upstream
`train()` does (its own classes, dataset and collator), for tests that need the model in-process."""
from pathlib import Path

import torch
from safetensors.torch import load_file


def build_model_and_batch(fx, *, batch_size=6, gradient_checkpointing=False, text_only=False, seed=0):
    import transformers
    from llava import conversation as conversation_lib
    from llava.model import LlavaLlamaForCausalLM
    from llava.train.train import DataArguments, ModelArguments, make_supervised_data_module

    torch.manual_seed(seed)
    model_args = ModelArguments(model_name_or_path=str(fx.llm), version="v1", vision_tower=str(fx.vision),
                                mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                                mm_use_im_patch_token=False)
    data_args = DataArguments(data_path=str(fx.data), lazy_preprocess=True, image_folder=str(fx.images),
                              image_aspect_ratio="pad")
    model = LlavaLlamaForCausalLM.from_pretrained(fx.llm)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()  # transformers 4.36: reentrant by default, as upstream trains
        model.enable_input_require_grads()
    tok = transformers.AutoTokenizer.from_pretrained(fx.llm, model_max_length=128, padding_side="right", use_fast=False)
    tok.pad_token = tok.unk_token
    conversation_lib.default_conversation = conversation_lib.conv_templates["v1"]
    model.get_model().initialize_vision_modules(model_args=model_args)
    model.get_vision_tower().to(dtype=torch.float16)
    data_args.image_processor = model.get_vision_tower().image_processor
    data_args.is_multimodal = True
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = 128
    model.config.mm_use_im_start_end = data_args.mm_use_im_start_end = False
    model.initialize_vision_tokenizer(model_args, tokenizer=tok)
    model.train()
    module = make_supervised_data_module(tokenizer=tok, data_args=data_args)
    ds = module["train_dataset"]
    idx = [i for i, r in enumerate(ds.list_data_dict) if ("image" in r) != text_only][:batch_size]
    if not text_only:  # mix in two text-only samples, as LLaVA data does
        idx = idx[:batch_size - 2] + [i for i, r in enumerate(ds.list_data_dict) if "image" not in r][:2]
    batch = module["data_collator"]([ds[i] for i in idx])
    return model, batch


def save_checkpoint(fx, out, seed=0):
    """An upstream LLaVA checkpoint directory (LlavaLlamaForCausalLM + tokenizer, projector initialised with
    `seed`) as upstream's train() leaves it: the vision tower is loaded from `mm_vision_tower` on open."""
    import transformers
    from llava.model import LlavaLlamaForCausalLM
    from llava.train.train import ModelArguments

    torch.manual_seed(seed)
    model_args = ModelArguments(model_name_or_path=str(fx.llm), version="v1", vision_tower=str(fx.vision),
                                mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                                mm_use_im_patch_token=False)
    model = LlavaLlamaForCausalLM.from_pretrained(fx.llm)
    model.get_model().initialize_vision_modules(model_args=model_args)
    model.config.image_aspect_ratio = "pad"
    model.config.mm_use_im_start_end = False
    model.config.tokenizer_model_max_length = 128
    model.save_pretrained(out, safe_serialization=True)
    tok = transformers.AutoTokenizer.from_pretrained(fx.llm, use_fast=False)
    tok.pad_token = tok.unk_token
    tok.save_pretrained(out)
    return out


def weights(path) -> dict:
    path = Path(path)
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(path.glob("pytorch_model*.bin")) + sorted(path.glob("adapter_model.bin")):
        out.update(torch.load(f, map_location="cpu"))
    return out
