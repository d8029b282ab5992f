"""LinguDistill through upstream LLaVA: the plumbing proof on upstream's own model and batch (token ids and
image mask recovered from its input preparation), the data json's per-sample override reaching the batch,
and `llava-train --regularizer distill` end to end (logged, routed, checkpointing on == off, no teacher saved)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import needs_llava, paired, run_entry, step_rows
from helpers.llava_models import weights

pytestmark = needs_llava


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "reentrant-checkpointing"])
def test_teacher_sees_what_the_student_sees_in_upstream_llava(tiny_llava, gc):
    from helpers.llava_models import build_model_and_batch
    from vlm_preserve import DistillConfig, attach
    from vlm_preserve.adapters import LlavaAdapter
    adapter = LlavaAdapter()

    model, batch = build_model_and_batch(tiny_llava, gradient_checkpointing=gc)
    for layers in ("all", "none"):
        cfg = DistillConfig(distill_teacher=str(tiny_llava.llm), distill_layers=layers, distill_route="all")
        att = attach(model, "distill", cfg, adapter=adapter)
        out = model(**batch)
        cap = att.session.capture
        cap.take_outputs(out)
        # the recovered ids are the tokens upstream embedded at the text positions
        text = cap.attention_mask & ~cap.image_mask
        with torch.no_grad():
            torch.testing.assert_close(model.get_model().embed_tokens(cap.input_ids[text]), cap.inputs_embeds[text])
        term = att.preserver.method("distill")
        sel = term.positions(cap)
        t, s = term.teacher_logits(cap, sel), cap.logits[sel].detach()
        if layers == "all":
            torch.testing.assert_close(t, s, rtol=0, atol=1e-5)
            assert term.loss(cap)[0].item() < 1e-7
        else:
            assert (t - s).abs().max() > 1e-3
        att.detach()


def test_data_json_override_reaches_the_batch_and_bad_values_fail(tiny_llava, tmp_path):
    import llava.train.train as upstream
    from helpers.llava_models import build_model_and_batch
    from vlm_preserve.adapters.llava import install_route_field
    from vlm_preserve.patching import Patches
    from vlm_preserve.regularizers.distill import ROUTE_KEY

    records = json.loads(tiny_llava.data.read_text())[:3]
    records[0]["distill"], records[1]["distill"] = True, False
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    model, _ = build_model_and_batch(tiny_llava, batch_size=2)  # also sets upstream's conversation template
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llava.llm, use_fast=False, model_max_length=128)
    tokenizer.pad_token = tokenizer.unk_token
    args = upstream.DataArguments(data_path=str(data), lazy_preprocess=True, image_folder=str(tiny_llava.images),
                                  image_aspect_ratio="pad")
    args.image_processor = model.get_vision_tower().image_processor
    args.is_multimodal, args.mm_use_im_start_end = True, False
    with Patches() as patches:
        install_route_field(patches, upstream, "distill")
        module = upstream.make_supervised_data_module(tokenizer=tokenizer, data_args=args)
        ds = module["train_dataset"]
        batch = module["data_collator"]([ds[i] for i in range(3)])
        assert batch[ROUTE_KEY].tolist() == [1, 0, -1]
        records[2]["distill"] = "yes"
        data.write_text(json.dumps(records))
        bad = upstream.make_supervised_data_module(tokenizer=tokenizer, data_args=args)["train_dataset"]
        with pytest.raises(ValueError, match="expected true or false"):
            bad[2]
    assert not hasattr(upstream.LazySupervisedDataset.__getitem__, "__wrapped__")
    assert ROUTE_KEY not in module["data_collator"]([ds[0]])  # undone: upstream's own collator again


def distill_rows(out):
    return [r for r in step_rows(out) if "distill_loss" in r]


@pytest.mark.parametrize("reg,mixed", [("distill", False), ("rdd,pre,distill", True)],
                         ids=["distill-fp32", "rdd,pre,distill-bf16-checkpointing"])
def test_llava_train_distill_end_to_end(tiny_llava, tmp_path, reg, mixed):
    out = tmp_path / "run"
    extra = {"bf16": "True", "gradient_checkpointing": "True"} if mixed else {}
    run_entry("plugin", tiny_llava.train_args(out, save_strategy="steps", save_steps=2, **extra)
              + ["--regularizer", reg, "--distill_route", "all"])
    rows = step_rows(out)
    assert len(rows) == 4 and all(math.isfinite(r["distill_loss"]) for r in rows)
    # teacher = --model_name_or_path's LLM, which upstream built the student from: KL 0 before the first update
    # (the teacher is loaded in the student's dtype: bf16 under --bf16 True)
    assert abs(rows[0]["distill_loss"]) < (1e-4 if mixed else 1e-6) and rows[-1]["distill_loss"] > 1e-3
    if "rdd" in reg:
        assert all(math.isfinite(r["rdd_loss"]) and math.isfinite(r["pre_loss"]) for r in rows)
    heads = out / "checkpoint-2" / "vlm_preserve_heads.safetensors"
    assert heads.exists() == ("pre" in reg)
    ckpt = set(weights(out / "checkpoint-2")) - (set(load_file(heads)) if heads.exists() else set())
    export = weights(out)
    assert ckpt == export.keys()  # the student only: no teacher tensors, no heads
    assert all(k.startswith(("model.", "lm_head.")) for k in export)


def test_routing_follows_the_rule_and_the_per_sample_field(tiny_llava, tmp_path):
    records = json.loads(tiny_llava.data.read_text())
    never = tmp_path / "never.json"
    never.write_text(json.dumps([dict(r, distill=False) for r in records]))
    run_entry("plugin", tiny_llava.train_args(tmp_path / "never", data_path=never) + ["--regularizer", "distill"])
    assert len(step_rows(tmp_path / "never")) == 4 and not distill_rows(tmp_path / "never")
    # the default rule distils text-only samples: logged on the steps whose batch holds one
    run_entry("plugin", tiny_llava.train_args(tmp_path / "auto") + ["--regularizer", "distill"])
    assert 0 < len(distill_rows(tmp_path / "auto")) <= 4


def test_gradient_checkpointing_on_equals_off(tiny_llava, tmp_path):
    for gc in ("False", "True"):
        run_entry("plugin", tiny_llava.train_args(tmp_path / gc, gradient_checkpointing=gc)
                  + ["--regularizer", "distill", "--distill_route", "all"])
    a, b = step_rows(tmp_path / "False"), step_rows(tmp_path / "True")
    for x, y in paired(a, b):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-4) and math.isclose(
            x["distill_loss"], y["distill_loss"], rel_tol=1e-3, abs_tol=1e-7)


def test_a_vlm_checkpoint_as_teacher_is_refused(tiny_llava, tmp_path):
    cfg = json.loads((tiny_llava.llm / "config.json").read_text())
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text(json.dumps(dict(cfg, mm_vision_tower="clip")))
    p = run_entry("plugin", tiny_llava.train_args(tmp_path / "x") + ["--regularizer", "distill",
                                                                        "--distill_teacher", str(vlm)], check=False)
    assert p.returncode == 2 and "is a vision-language checkpoint" in p.stderr, p.stderr[-800:]
