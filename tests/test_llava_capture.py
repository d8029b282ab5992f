"""The LLaVA adapter inside upstream's real model classes: image mask, embeddings, gradients reaching the
intended parameters, gradient checkpointing, text-only batches, invisibility of the capture."""
import pytest
import torch

from conftest import needs_llava
from vlm_preserve.regularizers import PReConfig, PreserveArguments, Preserver, RDDConfig, SoftLabelConfig

pytestmark = needs_llava


def configs(regularizer, **kw):
    out = {PreserveArguments: PreserveArguments(regularizer=regularizer), RDDConfig: RDDConfig(),
           PReConfig: PReConfig(), SoftLabelConfig: SoftLabelConfig()}
    for cls in (RDDConfig, PReConfig):
        for k, v in kw.items():
            if hasattr(out[cls], k):
                setattr(out[cls], k, v)
    return out


def step(model, batch, regularizer, *, hidden=False, **kw):
    """One forward through the patched model; returns (capture, preserver, total, logs)."""
    from vlm_preserve.adapters import LlavaAdapter
    from vlm_preserve.capture import CaptureSession
    adapter, slot = LlavaAdapter(), CaptureSession()
    preserver = Preserver(configs(regularizer, **kw), **adapter.model_dims(model))
    with adapter.install_capture(model, slot, visual_features=preserver.needs_visual_features):
        out = model(**batch, output_hidden_states=bool(preserver.hidden_layers) or hidden)
    cap = slot.capture
    cap.hidden_states = out.hidden_states
    cap.logits = out.logits
    total, logs = preserver.total_loss(out.loss, cap)
    return cap, preserver, total, logs, out


def test_image_mask_and_embeddings_match_an_independent_computation(tiny_llava):
    model, batch = build_model_and_batch(tiny_llava)
    cap, *_ = step(model, batch, "rdd")
    has_image = (batch["input_ids"] == -200).any(1)
    n_tok = model.get_vision_tower().num_patches
    # every image sample contributes its 16 patches; text-only samples none
    assert cap.image_mask.sum(1).tolist() == [n_tok if h else 0 for h in has_image.tolist()]
    with torch.no_grad():
        feats = model.encode_images(batch["images"][has_image])
    torch.testing.assert_close(cap.visual_embeds(), feats.reshape(-1, feats.shape[-1]))
    # text positions: exactly the attended non-image tokens, embedded by embed_tokens
    ids = batch["input_ids"]
    text_ids = torch.cat([row[m & (row != -200)] for row, m in zip(ids, batch["attention_mask"])])
    with torch.no_grad():
        ref = model.get_model().embed_tokens(text_ids)
    torch.testing.assert_close(cap.text_embeds(), ref)
    assert int(cap.attention_mask.sum()) == int(cap.text_mask.sum() + cap.image_mask.sum())


def test_capture_is_invisible_to_upstream(tiny_llava):
    model, batch = build_model_and_batch(tiny_llava)
    args = (batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"])
    ref = model.prepare_inputs_labels_for_multimodal(*args)
    from vlm_preserve.adapters import LlavaAdapter
    from vlm_preserve.capture import CaptureSession
    with LlavaAdapter().install_capture(model, CaptureSession()):
        got = model.prepare_inputs_labels_for_multimodal(*args)
    assert "prepare_inputs_labels_for_multimodal" not in vars(model)  # undone
    for a, b in zip(ref, got):
        assert (a is None and b is None) or torch.equal(a, b)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def nonzero(g):
    return g is not None and g.abs().sum() > 0


def test_rdd_gradient_reaches_projector_and_embedding_only(tiny_llava):
    model, batch = build_model_and_batch(tiny_llava)
    cap, pres, _, logs, _ = step(model, batch, "rdd")
    value, valid = pres.terms[0].loss(cap)
    g = _grads(model, value)
    assert valid and torch.isfinite(value)
    assert all(nonzero(v) for n, v in g.items() if "mm_projector" in n)
    assert nonzero(g["model.embed_tokens.weight"])
    assert not any(nonzero(v) for n, v in g.items() if ".layers." in n or "lm_head" in n)


@pytest.mark.parametrize("anchor", ["pre_llm", "pre_proj"])
def test_pre_gradient_reaches_layers_up_to_pre_layer_and_head(tiny_llava, anchor):
    model, batch = build_model_and_batch(tiny_llava)
    cap, pres, _, _, _ = step(model, batch, "pre", pre_layer="1", pre_anchor=anchor)
    head = pres.heads["pre"]
    value, valid = pres.terms[0].loss(cap)
    model.zero_grad(set_to_none=True)
    value.backward()
    assert valid and torch.isfinite(value)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for k in range(4):
        layer = [v for n, v in grads.items() if f".layers.{k}." in n]
        assert any(nonzero(v) for v in layer) == (k <= 1), k
    assert all(nonzero(p.grad) for p in head.parameters())
    assert not nonzero(grads["lm_head.weight"])
    assert any(nonzero(v) for n, v in grads.items() if "mm_projector" in n)  # through the layers, not the anchor


def test_pre_proj_anchor_is_the_vision_tower_features(tiny_llava):
    model, batch = build_model_and_batch(tiny_llava)
    cap, *_ = step(model, batch, "pre", pre_anchor="pre_proj")
    has_image = (batch["input_ids"] == -200).any(1)
    with torch.no_grad():
        feats = model.get_vision_tower()(batch["images"][has_image])
    torch.testing.assert_close(cap.visual_features, feats.reshape(-1, feats.shape[-1]))


def test_gradient_checkpointing_on_equals_off(tiny_llava):
    results = []
    for gc in (False, True):
        model, batch = build_model_and_batch(tiny_llava, gradient_checkpointing=gc)
        torch.manual_seed(1)
        _, pres, total, logs, _ = step(model, batch, "rdd,pre", pre_layer="2")
        params = dict(model.named_parameters())
        params.update({f"head.{n}": p for n, p in pres.heads.named_parameters()})
        model.zero_grad(set_to_none=True)
        pres.heads.zero_grad(set_to_none=True)
        total.backward()
        results.append(({k: v.item() for k, v in logs.items()},
                        {n: p.grad.clone() for n, p in params.items() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_text_only_batch_runs_the_same_path_with_zero_weight(tiny_llava):
    model, batch = build_model_and_batch(tiny_llava, text_only=True, batch_size=4)
    cap, pres, total, logs, out = step(model, batch, "rdd,pre")
    assert int(cap.image_mask.sum()) == 0
    assert logs["rdd_loss"] is None and logs["pre_loss"] is None
    assert torch.isfinite(total) and total.item() == pytest.approx(out.loss.item(), rel=1e-6)
    model.zero_grad(set_to_none=True)
    total.backward()
    # the head ran (its ZeRO-3 gather happens on every rank) and got a finite, zero gradient
    for p in pres.heads.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_soft_label_replaces_the_lm_loss(tiny_llava):
    model, batch = build_model_and_batch(tiny_llava)
    from vlm_preserve.regularizers.soft_label import soft_label_loss
    cap, pres, total, logs, out = step(model, batch, "soft_label")
    assert total.item() == pytest.approx(soft_label_loss(out.logits, cap.labels, "uniform", 0.1).item(), rel=1e-6)
    assert logs["lm_loss"].item() == pytest.approx(out.loss.item())
    # recovered labels are upstream's labels: the soft loss at alpha 0 equals upstream's own loss
    assert soft_label_loss(out.logits, cap.labels, "uniform", 0.0).item() == pytest.approx(out.loss.item(), rel=1e-5)


from helpers.llava_models import build_model_and_batch  # noqa: E402
