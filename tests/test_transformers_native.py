"""transformers-native VLMs (5.x layout) through the Python API: image masks against where the model put
the image features, gradients, invisibility when detached, gradient checkpointing, text-only batches, and
the Trainer path (terms logged, heads in checkpoints, resume, clean save_pretrained)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("needs transformers >= 4.52 (the transformers-native environment)", allow_module_level=True)

from helpers.native_models import KINDS, build, image_features, make_batch  # noqa: E402
from vlm_preserve import ConfigError, GenericAdapter, PReConfig, attach  # noqa: E402
from vlm_preserve.adapters import transformers_native as native  # noqa: E402


def image_inputs(batch):
    keys = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")
    return {k: v for k, v in batch.items() if k in keys}


def forward(model, batch, att=None):
    out = model(**batch, **(att.forward_kwargs() if att else {}))
    return out, (att.total_loss(out.loss, out) if att else (out.loss, {}))


@pytest.mark.parametrize("kind", KINDS)
def test_image_mask_is_where_the_model_placed_the_image_features(kind):
    model = build(kind)
    batch = make_batch(model, kind)
    att = attach(model, "rdd")
    model(**batch)
    cap = att.session.capture
    torch.testing.assert_close(cap.visual_embeds(), image_features(model, kind, image_inputs(batch)))
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()
    text = ids[attn & (ids != 299)]
    with torch.no_grad():
        ref = native.language_model(model).embed_tokens(text)
    torch.testing.assert_close(cap.text_embeds(), ref)
    att.detach()


def nonzero(p):
    return p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_intended_modules(kind):
    model = build(kind)
    batch = make_batch(model, kind)
    lm, proj = native.language_model(model), native.projector(model)
    att = attach(model, "rdd,pre", PReConfig(pre_layer="1"))
    rdd, pre = att.preserver.terms
    model(**batch, **att.forward_kwargs())
    cap = att.session.capture
    assert cap.hidden_states is not None  # taken from the language model's own output
    model.zero_grad(set_to_none=True)
    rdd.loss(cap)[0].backward(retain_graph=True)
    assert all(nonzero(p) for p in proj.parameters() if p.requires_grad)
    assert nonzero(lm.embed_tokens.weight)
    assert not any(nonzero(p) for p in lm.layers.parameters())
    model.zero_grad(set_to_none=True)
    pre.loss(cap)[0].backward()
    for k, layer in enumerate(lm.layers):
        assert any(nonzero(p) for p in layer.parameters()) == (k <= 1), k
    assert all(nonzero(p) for p in att.heads.parameters())
    att.detach()


def grads_and_loss(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
def test_detached_and_disabled_are_plain_transformers_bit_for_bit(kind):
    model = build(kind)
    batch = make_batch(model, kind)
    ref_loss, ref_grads = grads_and_loss(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attach(model, "rdd,pre,attention_tuning").detach()
    assert not hasattr(model, "vlm_preserve_heads") and all(p.requires_grad for p in model.parameters())
    assert [len(m._forward_pre_hooks) for m in model.modules()] == [0] * len(list(model.modules()))
    assert "save_pretrained" not in vars(model)
    loss, grads = grads_and_loss(model, batch)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    off = attach(model, "none")  # disabled: attached but with no term, the model is untouched
    assert hooks == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    loss, grads = grads_and_loss(model, batch)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    assert off.total_loss(loss)[0] is loss
    off.detach()
    with pytest.raises(ConfigError, match="unknown term"):
        attach(model, "rdd,bogus")


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_on_equals_off(kind):
    results = []
    for gc in (False, True):
        model = build(kind)
        model.train()
        if gc:
            model.gradient_checkpointing_enable()
        batch = make_batch(model, kind)
        att = attach(model, "rdd,pre")
        out, (total, logs) = forward(model, batch, att)
        model.zero_grad(set_to_none=True)
        total.backward()
        results.append(({k: v.item() for k, v in logs.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-5) and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_text_only_batch_runs_the_zero_weighted_path(kind):
    model = build(kind)
    batch = make_batch(model, kind, text_only=True)
    att = attach(model, "rdd,pre")
    out, (total, logs) = forward(model, batch, att)
    assert logs["rdd_loss"] is None and logs["pre_loss"] is None
    assert total.item() == pytest.approx(out.loss.item(), rel=1e-6)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in att.heads.parameters())


def vision_tower_features(model, kind, pixel_values):
    """What the projector receives, from the vision tower itself: Llava's penultimate layer without CLS
    ("default" strategy), PaliGemma's last layer."""
    if kind == "llava":
        return model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    return model.model.vision_tower(pixel_values).last_hidden_state


@pytest.mark.parametrize("kind", ["llava", "paligemma"])
def test_pre_proj_anchor_is_the_vision_towers_features(kind):
    model = build(kind)
    batch = make_batch(model, kind)
    att = attach(model, "pre", PReConfig(pre_anchor="pre_proj"))
    model(**batch, **att.forward_kwargs())
    feats = att.session.capture.visual_features
    vt = vision_tower_features(model, kind, batch["pixel_values"])
    torch.testing.assert_close(feats, vt.reshape(-1, vt.shape[-1]))
    att.detach()


@pytest.mark.parametrize("kind", ["qwen2_vl", "gemma3", "internvl", "idefics3"])
def test_pre_proj_anchor_refused_where_the_projector_merges_patches(kind):
    with pytest.raises(ConfigError, match="pre_proj is supported for LlavaForConditionalGeneration, PaliGemma"):
        attach(build(kind), "pre", PReConfig(pre_anchor="pre_proj"))


def test_cross_attention_vlm_is_refused_with_the_reason():
    """Mllama's images enter the language model through cross-attention layers: no visual tokens in its sequence."""
    T = transformers
    text = T.MllamaTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1], pad_token_id=0)
    vision = T.MllamaVisionConfig(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                                  intermediate_size=64, vision_output_dim=64, image_size=32, patch_size=8,
                                  max_num_tiles=1, intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
    cfg = T.MllamaConfig(text_config=text, vision_config=vision, image_token_index=299)
    model = T.MllamaForConditionalGeneration(cfg)
    for terms in ("rdd", "pre"):
        with pytest.raises(ConfigError, match="MllamaForConditionalGeneration is not supported: its images enter the "
                                              "language model by cross-attention, so there are no visual tokens"):
            attach(model, terms)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_qwen3_vl_deepstack_mergers_train_with_the_projector_under_attention_tuning():
    model = build("qwen3_vl")
    model.requires_grad_(False)
    att = attach(model, "attention_tuning")
    visual = model.model.visual
    assert all(p.requires_grad for p in visual.merger.parameters())
    assert all(p.requires_grad for p in visual.deepstack_merger_list.parameters())
    assert not any(p.requires_grad for p in visual.blocks.parameters())
    att.detach()
    assert not any(p.requires_grad for p in model.parameters())


def test_unsupported_model_names_the_supported_classes_and_the_generic_adapter():
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                                num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(ConfigError) as e:
        attach(lm, "rdd")
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg and "Qwen2_5_VLForConditionalGeneration" in msg and "GenericAdapter" in msg


def test_generic_adapter_pointed_at_a_missing_module_names_what_exists():
    model = build("llava")
    bad = GenericAdapter(embed="model.language_model.embed_tokens", projector="model.mm_projector",
                         layers="model.language_model.layers", image_token_id=299)
    with pytest.raises(ConfigError) as e:
        attach(model, "rdd", adapter=bad)
    msg = str(e.value)
    assert "'model.mm_projector'" in msg and "multi_modal_projector" in msg and "language_model" in msg
    with pytest.raises(ConfigError, match="exactly one of image_token_id"):
        GenericAdapter(embed="a", projector="b", layers="c")


def test_old_layout_paths_resolve():
    """transformers <= 4.51 put language_model (a CausalLM) and the projector at the top level."""
    class OldLlava(torch.nn.Module):
        pass
    OldLlava.__name__ = "LlavaForConditionalGeneration"
    new = build("llava")
    old = OldLlava()
    old.config = new.config
    old.vision_tower = new.model.vision_tower
    old.multi_modal_projector = new.model.multi_modal_projector
    causal = torch.nn.Module()
    causal.model = new.model.language_model
    causal.lm_head = new.lm_head
    old.language_model = causal
    assert native.language_model(old) is new.model.language_model
    assert native.projector(old) is new.model.multi_modal_projector
    assert native.TransformersAdapter().llm_modules(old)[1] is new.lm_head
