"""LinguDistill on transformers-native VLMs (Llama, Qwen2 and Gemma 3 LLMs): the plumbing proofs (the teacher sees
exactly what the student sees when its weights are the student's LLM, so KL and gradient are 0), routing,
gradient checkpointing, and the Trainer path (logged, student-only gradients, teacher unchanged and never
saved). Upstream LLaVA's side is in test_distill_llava.py."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("needs transformers >= 4.52 (the transformers-native environment)", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from helpers.native_models import build, make_batch, rows, teacher_of, trainer_for  # noqa: E402
from vlm_preserve import ConfigError, DistillConfig, attach  # noqa: E402

# Llama, Llama, Qwen2, Gemma 3 (bidirectional among image tokens only), Qwen2, Llama, Llama language models
KINDS = ("llava", "llava_next", "llava_onevision", "gemma3", "internvl", "idefics3", "smolvlm")


def step(model, batch, att):
    out = model(**batch)
    cap = att.session.capture
    cap.take_outputs(out)
    return out, cap


@pytest.mark.parametrize("kind,batch_kind", [(k, "mixed") for k in KINDS]
                         + [("llava", "text_only"), ("llava_onevision", "image_only")])
def test_teacher_sees_exactly_what_the_student_sees(kind, batch_kind):
    model = build(kind).eval()
    batch = make_batch(model, kind, text_only=batch_kind == "text_only", batch=1 if batch_kind == "image_only" else 3)
    params = [p for p in model.parameters() if p.requires_grad]
    for layers in ("all", "none"):
        att = attach(model, "distill", DistillConfig(distill_layers=layers, distill_route="all"),
                     teacher=teacher_of(model))
        out, cap = step(model, batch, att)
        term = att.preserver.method("distill")
        sel = term.positions(cap)
        assert int(sel.sum()) > 0
        t, s = term.teacher_logits(cap, sel), cap.logits[sel]
        value, valid = term.loss(cap)
        if layers == "all" or batch_kind == "text_only":
            torch.testing.assert_close(t, s.detach(), rtol=0, atol=1e-5)  # equal up to attention-kernel rounding
            assert valid and value.item() < 1e-7
            grads = torch.autograd.grad(value, params, allow_unused=True)
            assert all(g is None or g.abs().max() < 1e-6 for g in grads)  # zero up to kernel rounding
        else:  # sharing off: the teacher does not see the image, so its predictions differ
            assert (t - s).abs().max() > 1e-3 and value.item() > 0
        att.detach()


def test_teacher_loaded_from_a_path_is_frozen_outside_the_model_and_never_saved(tmp_path):
    model = build("llava")
    teacher_of(model).save_pretrained(tmp_path / "llm")
    model.save_pretrained(tmp_path / "plain")
    before = set(model.state_dict())
    att = attach(model, "distill", DistillConfig(distill_teacher=str(tmp_path / "llm"), distill_route="all"))
    teacher = att.preserver.method("distill").teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert set(model.state_dict()) == before  # not a submodule: in no state dict, optimizer or checkpoint
    _, cap = step(model, make_batch(model, "llava"), att)
    assert att.preserver.method("distill").loss(cap)[0].item() < 1e-7
    model.save_pretrained(tmp_path / "export")
    assert set(load_file(tmp_path / "export" / "model.safetensors")) == set(load_file(tmp_path / "plain" / "model.safetensors"))


def test_bad_teacher_and_layers_fail_clearly(tmp_path):
    model = build("llava")
    with pytest.raises(ConfigError, match="needs --distill_teacher"):
        attach(model, "distill")
    with pytest.raises(ConfigError, match="out of range for a 4-layer LLM"):
        attach(model, "distill", DistillConfig(distill_layers="0,7"), teacher=teacher_of(model))
    small = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**{**model.config.text_config.to_dict(), "num_hidden_layers": 2}))
    with pytest.raises(ConfigError, match="teacher has 2 decoder layers"):
        attach(model, "distill", teacher=small)
    model.save_pretrained(tmp_path / "vlm")
    with pytest.raises(ConfigError, match="vision-language checkpoint"):
        attach(model, "distill", DistillConfig(distill_teacher=str(tmp_path / "vlm")))
    for kind in ("qwen2_vl", "qwen3_vl"):
        with pytest.raises(ConfigError, match="M-RoPE"):
            attach(build(kind), "distill", teacher=torch.nn.Module())  # refused before the teacher is looked at
    with pytest.raises(ConfigError, match="prompt attends bidirectionally"):
        attach(build("paligemma"), "distill", teacher=torch.nn.Module())


def test_routing_rule_and_per_sample_override():
    model = build("llava")
    batch = make_batch(model, "llava")  # sample 0: image, 1: text only, 2: image
    supervised = (batch["labels"] != -100).sum(1).tolist()

    def routed(route=None, **cfg):
        att = attach(model, "distill", DistillConfig(**cfg), teacher=teacher_of(model))
        _, cap = step(model, batch, att)
        if route is not None:
            cap.extra["route"] = torch.tensor(route)
        got = att.preserver.method("distill").positions(cap).any(1).tolist()
        att.detach()
        return got

    assert routed(distill_min_response_tokens=1000) == [False, True, False]  # auto: text-only
    threshold = supervised[2]  # sample 2 has the longest answer
    assert routed(distill_min_response_tokens=threshold) == [False, True, True]  # auto: + long answers
    assert routed(distill_route="long_response", distill_min_response_tokens=threshold) == [False, False, True]
    assert routed(distill_route="text_only") == [False, True, False]
    assert routed(distill_route="all") == [True, True, True]
    assert routed([1, 0, -1], distill_min_response_tokens=1000) == [True, False, False]


def grads(model, batch, teacher, gc: bool, kv_grad: bool = False):
    torch.manual_seed(0)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad()
    att = attach(model, "distill", DistillConfig(distill_route="all", distill_kv_grad=kv_grad), teacher=teacher)
    out = model(**batch)
    loss, logs = att.total_loss(out.loss, out)
    loss.backward()
    att.detach()
    if gc:
        model.gradient_checkpointing_disable()
    return logs["distill_loss"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_on_equals_off_and_the_kv_gradient_option():
    model = build("llava").eval()  # dropout-free either way
    batch = make_batch(model, "llava")
    teacher = teacher_of(model, noise=0.05)
    value, off = grads(model, batch, teacher, gc=False)
    value_gc, on = grads(model, batch, teacher, gc=True)
    assert value.item() > 0
    torch.testing.assert_close(value_gc, value)
    assert off.keys() == on.keys()
    for n in off:
        torch.testing.assert_close(on[n], off[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(p.grad is None for p in teacher.parameters())
    # with the keys/values not detached, the distillation gradient also reaches the projector through them
    _, through_kv = grads(model, batch, teacher, gc=False, kv_grad=True)
    proj = [n for n in off if "multi_modal_projector" in n]
    assert proj and any(not torch.allclose(through_kv[n], off[n]) for n in proj)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("reg", ["distill", "rdd,pre,distill"])
def test_trainer_path(reg, tmp_path):
    model = build("llava_onevision")
    teacher = teacher_of(model, noise=0.05)
    teacher0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    model.save_pretrained(tmp_path / "plain")
    trainer = trainer_for(model, "llava_onevision", tmp_path / "run", save_strategy="steps")
    handle = attach(trainer, reg, DistillConfig(distill_route="all"), teacher=teacher)
    trainer.train()
    logged = rows(trainer)
    assert len(logged) == 4 and all(math.isfinite(r["distill_loss"]) and r["distill_loss"] > 0 for r in logged)
    if "rdd" in reg:  # the text-only batch (step 4) has no RDD/PRe term, but is distilled
        assert sum("rdd_loss" in r for r in logged) == 3
    assert all(torch.equal(teacher0[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    ckpt = tmp_path / "run" / "checkpoint-2"
    saved = set(load_file(ckpt / "model.safetensors"))
    assert saved == set(load_file(tmp_path / "plain" / "model.safetensors"))  # the student only: no teacher, no head
    if "pre" in reg:
        assert all(k.startswith("pre.") for k in load_file(ckpt / "vlm_preserve_heads.safetensors"))
    else:
        assert not (ckpt / "vlm_preserve_heads.safetensors").exists()
    handle.detach()


def test_generic_adapter_gives_the_same_distillation_as_the_native_one():
    from vlm_preserve import GenericAdapter
    model = build("llava").eval()
    batch = make_batch(model, "llava")
    teacher = teacher_of(model, noise=0.05)
    generic = GenericAdapter(embed="model.language_model.embed_tokens", projector="model.multi_modal_projector",
                             layers="model.language_model.layers", image_token_id=model.config.image_token_id,
                             lm_head="lm_head")
    values = []
    for adapter in (None, generic):
        att = attach(model, "distill", DistillConfig(distill_route="all"), teacher=teacher, adapter=adapter)
        out = model(**batch)
        values.append(att.total_loss(out.loss, out)[1]["distill_loss"])
        att.detach()
    assert values[0] > 0
    torch.testing.assert_close(values[1], values[0])
