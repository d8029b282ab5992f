"""A regularizer term that turns NaN or infinite never reaches the weights: by default the step's term is left out
(logged by name, counted), with `--nonfinite_terms raise` the run stops with an error naming the term."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("needs transformers >= 4.52 (the transformers-native environment)", allow_module_level=True)

from helpers.native_models import build, make_batch, rows, trainer_for  # noqa: E402
from vlm_preserve import ConfigError, NonFiniteTermError, PreserveArguments, RDDConfig, attach  # noqa: E402
from vlm_preserve.regularizers import pre as pre_module  # noqa: E402
from vlm_preserve.regularizers import rdd as rdd_module  # noqa: E402


def poison(monkeypatch, cls, when, value=float("inf")):
    """Make `cls.loss` return a non-finite value at the calls numbered in `when` (1-based), still connected to the
    graph (a real overflow: the term's backward would carry 0 · inf = NaN into the weights)."""
    calls = []
    original = cls.loss

    def loss(self, cap):
        v, ok = original(self, cap)
        calls.append(1)
        return (v * value if len(calls) in when else v), ok
    monkeypatch.setattr(cls, "loss", loss)
    return calls


def grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_nonfinite_term_is_left_out_and_the_weights_get_the_lm_gradient_only(monkeypatch, value):
    batch = make_batch(build("llava"), "llava")
    ref = build("llava")
    ref(**batch).loss.backward()
    lm_only = grads(ref)
    model = build("llava")
    att = attach(model, "rdd,pre", RDDConfig(rdd_weight=0.0))   # RDD stays in the sum, contributing no gradient
    poison(monkeypatch, pre_module.PRe, when={1}, value=value)
    out = model(**batch, **att.forward_kwargs())
    total, logs = att.total_loss(out.loss, out)
    assert math.isfinite(total.item()) and logs["pre_loss"] is None and logs["pre_skipped_steps"].item() == 1
    assert logs["rdd_loss"] is not None and math.isfinite(logs["rdd_loss"].item())  # the other term stays
    total.backward()
    got = grads(model)
    heads = [n for n in got if "vlm_preserve_heads" in n]
    assert heads and all(got[n] is not None and not got[n].any() for n in heads)  # in the backward, with zeros
    for name, g in got.items():
        if name not in heads:
            assert (g is None) == (lm_only[name] is None), name
            if g is not None:
                torch.testing.assert_close(g, lm_only[name], msg=name)   # the LM loss's gradient, finite
    att.detach()


def test_raise_names_the_term(monkeypatch):
    model = build("llava")
    batch = make_batch(model, "llava")
    att = attach(model, "rdd,pre", PreserveArguments(nonfinite_terms="raise"))
    poison(monkeypatch, rdd_module.RDD, when={1}, value=float("nan"))
    out = model(**batch, **att.forward_kwargs())
    with pytest.raises(NonFiniteTermError, match="the rdd term is nan"):
        att.total_loss(out.loss, out)
    att.detach()
    with pytest.raises(ConfigError, match="--nonfinite_terms 'ignore' is not one of: skip, raise"):
        attach(build("llava"), "rdd", PreserveArguments(nonfinite_terms="ignore"))


def test_a_trainer_run_with_a_nonfinite_step_keeps_finite_weights_and_counts_the_skip(monkeypatch, tmp_path):
    model = build("llava")
    trainer = trainer_for(model, "llava", tmp_path / "run", max_steps=4)
    handle = attach(trainer, "rdd,pre")
    poison(monkeypatch, pre_module.PRe, when={2})
    trainer.train()
    logged = rows(trainer)
    assert len(logged) == 4 and all(math.isfinite(r["loss"]) for r in logged)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    counts = [r.get("pre_skipped_steps") for r in logged]
    assert counts[0] is None and counts[1] == 1 and all(c == 1 for c in counts[1:]), counts
    assert "pre_loss" not in logged[1] and "rdd_loss" in logged[1]
    handle.detach()

    trainer = trainer_for(build("llava"), "llava", tmp_path / "raise", max_steps=4)
    attach(trainer, "rdd,pre", PreserveArguments(nonfinite_terms="raise"))
    poison(monkeypatch, pre_module.PRe, when={2})
    with pytest.raises(NonFiniteTermError, match="the pre term is inf"):
        trainer.train()
