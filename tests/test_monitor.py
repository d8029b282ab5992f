"""The language monitor (`monitor.py`): the metric's value, what is scored, bad text sets refused before any model
loads, and — through the Python API on a plain transformers Trainer and through `llava-train` — training unchanged
(identical losses with the monitor on and off) and the logged value equal to the offline metric of the checkpoint
saved at that step."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, needs_llava, run_entry, step_rows
from helpers.native_models import word_tokenizer
from vlm_preserve.config import ConfigError
from vlm_preserve.monitor import LanguageMonitorConfig, encode, encode_all, language_nll, load_texts, nll_sum

TEXTS = [{"text": "the red circle is in the top left corner of the image"},
         {"text": "how many small squares are there"},
         {"messages": [{"role": "user", "content": "what is the color of the shape"},
                       {"role": "assistant", "content": "the shape is blue"},
                       {"role": "user", "content": "and the circle"},
                       {"role": "assistant", "content": "it is a bright yellow circle"}]}]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


# ---- the text set and the flags -----------------------------------------------------------------------------------

def test_builtin_set_ships_both_kinds():
    items = load_texts("builtin")
    assert len(items) == 40
    assert sum("text" in i for i in items) == 30 and sum("messages" in i for i in items) == 10


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("", "is empty: give at least one line"),
    ("\n  \n", "is empty"),
    ('{"text": "fine"}\n{"text": "broken\n', "line 2: not valid JSON"),
    ('{"text": "fine"}\n\n{"prompt": "x"}\n', "line 3: expected an object with either a 'text' or a 'messages' field"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: 'messages' has no assistant turn"),
    ('{"messages": [{"role": "user", "content": [{"type": "text"}]}]}\n', "line 1: message 0 must be"),
    ('{"text": ""}\n', "line 1: 'text' must be a non-empty string"),
])
def test_bad_text_sets_say_what_and_where(tmp_path, content, message):
    path = tmp_path / "texts.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        LanguageMonitorConfig(str(path), 10).validate()
    assert message in str(e.value) and str(path) in str(e.value)
    if "line" in message or "no such file" in message:  # the expected formats are named
        assert '{"text": "..."} or {"messages": [' in str(e.value)


@pytest.mark.parametrize("cfg,given,message", [
    (LanguageMonitorConfig("builtin", 0), None, "--language_monitor_steps 0: with --language_monitor"),
    (LanguageMonitorConfig("builtin", -3), None, "--language_monitor_steps -3"),
    (LanguageMonitorConfig("", 50), None, "--language_monitor_steps was given but --language_monitor is not"),
    (LanguageMonitorConfig("", 0), {"language_monitor_steps"}, "--language_monitor_steps was given"),
    (LanguageMonitorConfig("", 0, 64), None, "--language_monitor_max_tokens was given"),
    (LanguageMonitorConfig("builtin", 5, 1), None, "--language_monitor_max_tokens 1 leaves no token"),
])
def test_bad_flags(cfg, given, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cfg.validate(given)


def test_off_by_default():
    assert LanguageMonitorConfig().validate() == [] and LanguageMonitorConfig().validate(set()) == []


# ---- the metric ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm():
    """A tiny random Llama and a word-level tokenizer with a BOS and no chat template (both environments)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = word_tokenizer(template=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval(), tok


def test_value_is_the_token_weighted_mean_nll(llm):
    model, tok = llm
    items = TEXTS[:2]
    with torch.no_grad():
        losses = []
        for it in items:
            ids = tok(it["text"], return_tensors="pt")["input_ids"]
            losses.append((model(input_ids=ids, labels=ids).loss.item(), ids.shape[1] - 1))
    expected = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    assert language_nll(model, tok, items) == pytest.approx(expected, rel=1e-6)
    # truncation: only the first 5 tokens of each item (4 predictions each)
    with torch.no_grad():
        short = [model(input_ids=ids, labels=ids).loss.item() for ids in
                 (tok(it["text"], return_tensors="pt")["input_ids"][:, :5] for it in items)]
    assert language_nll(model, tok, items, max_tokens=5) == pytest.approx(sum(short) / 2, rel=1e-6)


def test_chat_without_template_scores_the_replies_after_a_plain_rendering(llm):
    _, tok = llm
    assert not getattr(tok, "chat_template", None)
    ids, scored = encode(tok, TEXTS[2], 256)
    names = tok.convert_ids_to_tokens(ids)
    runs, cur = [], []
    for n, s in zip(names, scored):
        if s:
            cur.append(n)
        elif cur:
            runs.append(" ".join(cur))
            cur = []
    runs += [" ".join(cur)] if cur else []
    assert runs == ["the shape is blue", "it is a bright yellow circle"]
    assert names[:4] == ["<s>", "User:", "what", "is"] and "[UNK]" not in names
    assert names[names.index("blue") + 1:names.index("blue") + 3] == ["User:", "and"]


def test_chat_with_template_scores_the_replies_and_their_end_of_turn():
    tok = word_tokenizer()
    item = {"messages": [{"role": "user", "content": "what is this"}, {"role": "assistant", "content": "a red circle"},
                         {"role": "user", "content": "and that"}, {"role": "assistant", "content": "it is blue"}]}
    ids, scored = encode(tok, item, 256)
    names = tok.convert_ids_to_tokens(ids)
    assert "[UNK]" not in names
    # (this tokenizer drops whitespace, the template's newlines included)
    assert [n for n, s in zip(names, scored) if s] == ["a", "red", "circle", "<|im_end|>", "it", "is", "blue", "<|im_end|>"]
    assert names[:9] == ["<|im_start|>", "user", "what", "is", "this", "<|im_end|>", "<|im_start|>", "assistant", "a"]
    # cut inside the first reply: its first token only
    assert sum(encode(tok, item, 9)[1]) == 1


def test_a_set_with_nothing_left_to_score_is_refused(llm):
    _, tok = llm
    long_prompt = {"messages": [{"role": "user", "content": "red " * 50}, {"role": "assistant", "content": "blue"}]}
    with pytest.raises(ConfigError, match="no token to score within 8 tokens"):
        encode_all(tok, [long_prompt], 8)


class Noisy(torch.nn.Module):
    """A model whose forward draws from every RNG and whose submodules start in mixed modes."""
    def __init__(self):
        super().__init__()
        self.emb, self.drop, self.head = torch.nn.Embedding(700, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 700)
        self.head.eval()

    def forward(self, input_ids, attention_mask=None):
        random.random(), np.random.rand(), torch.rand(1)
        assert not self.training and not torch.is_grad_enabled()
        return {"logits": self.head(self.drop(self.emb(input_ids)))}


def test_evaluation_leaves_rng_modes_and_grads_as_they_were(llm):
    _, tok = llm
    model = Noisy().train()
    model.head.eval()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    value = language_nll(model, tok, TEXTS)
    after = (random.random(), np.random.rand(), torch.rand(3))
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    assert after[0] == random.random() and after[1] == np.random.rand() and torch.equal(after[2], torch.rand(3))
    assert model.training and model.drop.training and model.emb.training and not model.head.training
    assert all(p.grad is None for p in model.parameters()) and value > 0
    # without the guard the same forwards move the RNGs (so the check above can fail)
    torch.manual_seed(1)
    with torch.no_grad():
        nll_sum(model.eval(), encode_all(tok, TEXTS, 256), "cpu")
    assert not torch.equal(torch.rand(3), after[2])


# ---- the Python API on a plain transformers Trainer ---------------------------------------------------------------

def _native_run(tmp_path, name, *, regularizer=None, monitor=None, resume=None, max_steps=4):
    transformers = pytest.importorskip("transformers")
    from helpers.native_models import build, make_batch

    from vlm_preserve import attach
    model = build("llava")

    class Batches(torch.utils.data.Dataset):
        items = [make_batch(model, "llava", seed=i, text_only=(i == 3)) for i in range(4)]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.items[i]

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=1, max_steps=max_steps, logging_steps=1,
        learning_rate=1e-3, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, seed=0,
        remove_unused_columns=False, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Batches(), data_collator=lambda xs: xs[0],
                                   processing_class=word_tokenizer())  # the monitor's tokenizer
    if regularizer:
        attach(trainer, regularizer, monitor=monitor)
    elif monitor is not None:
        from vlm_preserve import add_language_monitor
        add_language_monitor(trainer, monitor.language_monitor, monitor.language_monitor_steps)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _needs_native():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip("needs the transformers-native environment")


@pytest.mark.parametrize("regularizer", [None, "rdd,pre"])
def test_api_monitor_leaves_training_unchanged_and_logs_the_checkpoints_value(tmp_path, regularizer):
    _needs_native()
    import transformers
    texts = write_jsonl(tmp_path / "texts.jsonl", TEXTS)
    off = _native_run(tmp_path, "off", regularizer=regularizer)
    cfg = LanguageMonitorConfig(str(texts), 2)
    on = _native_run(tmp_path, "on", regularizer=regularizer, monitor=cfg)
    loss_off = [r["loss"] for r in off.state.log_history if "loss" in r]
    loss_on = [r["loss"] for r in on.state.log_history if "loss" in r]
    assert len(loss_off) == 4 and loss_on == loss_off
    monitored = [r for r in on.state.log_history if "lang_nll" in r]
    assert [r["step"] for r in monitored] == [0, 2, 4]
    assert not any("lang_nll" in r for r in off.state.log_history)
    ref = monitored[0]["lang_nll"]
    assert monitored[0]["lang_nll_delta"] == 0.0
    for r in monitored[1:]:
        assert r["lang_nll_delta"] == pytest.approx(r["lang_nll"] - ref, abs=1e-9)
    assert monitored[1]["lang_nll"] != ref  # training moved it: the monitor sees the current weights
    # the value logged at step 2 is the offline metric of checkpoint-2
    saved = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "on" / "checkpoint-2"))
    offline = language_nll(saved, word_tokenizer(), str(texts))
    assert offline == pytest.approx(monitored[1]["lang_nll"], rel=1e-5)
    if regularizer:
        assert all("lm_loss" in r for r in on.state.log_history if "loss" in r)


def test_api_resume_keeps_the_step0_reference_from_the_checkpoint(tmp_path):
    _needs_native()
    texts = write_jsonl(tmp_path / "texts.jsonl", TEXTS)
    cfg = LanguageMonitorConfig(str(texts), 2)
    first = _native_run(tmp_path, "run", monitor=cfg, max_steps=2)
    ref = next(r["lang_nll"] for r in first.state.log_history if r["step"] == 0 and "lang_nll" in r)
    resumed = _native_run(tmp_path, "run", monitor=cfg, resume=str(tmp_path / "run" / "checkpoint-2"))
    rows = [r for r in resumed.state.log_history if "lang_nll" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]  # the history carried over, no second step-0 evaluation
    assert rows[2]["lang_nll_delta"] == pytest.approx(rows[2]["lang_nll"] - ref, abs=1e-9)
    # a checkpoint written without the monitor: lang_nll only, and a warning says why
    plain = _native_run(tmp_path, "plain", max_steps=2)
    assert plain.state.global_step == 2
    with pytest.warns(UserWarning, match="no step-0 lang_nll"):
        again = _native_run(tmp_path, "plain", monitor=cfg, resume=str(tmp_path / "plain" / "checkpoint-2"))
    rows = [r for r in again.state.log_history if "lang_nll" in r]
    assert [r["step"] for r in rows] == [4] and "lang_nll_delta" not in rows[0]


# ---- llava-train -------------------------------------------------------------------------------------------------

def llava_train(args):
    code = "from vlm_preserve.cli.llava_train import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


@pytest.mark.parametrize("flags,message", [
    (["--language_monitor", "{missing}", "--language_monitor_steps", "5"], "no such file"),
    (["--language_monitor", "{empty}", "--language_monitor_steps", "5"], "is empty"),
    (["--language_monitor", "{bad}", "--language_monitor_steps", "5"], "line 2: not valid JSON"),
    (["--language_monitor", "builtin"], "--language_monitor_steps 0: with --language_monitor"),
    (["--language_monitor", "builtin", "--language_monitor_steps", "0"], "--language_monitor_steps 0"),
    (["--language_monitor_steps", "5"], "--language_monitor_steps was given but --language_monitor is not"),
])
def test_llava_train_refuses_bad_monitor_input_before_anything_loads(tiny_llava, tmp_path, flags, message):
    files = {"missing": tmp_path / "nope.jsonl", "empty": tmp_path / "empty.jsonl", "bad": tmp_path / "bad.jsonl"}
    files["empty"].write_text("")
    files["bad"].write_text('{"text": "ok"}\n{text: nope}\n')
    flags = [f.format(**files) for f in flags]
    p = llava_train(tiny_llava.train_args(tmp_path / "never") + flags)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
    assert "Formatting inputs" not in p.stdout + p.stderr and not (tmp_path / "never").exists()


@needs_llava
@pytest.mark.parametrize("regularizer", ["none", "rdd"])
def test_llava_train_monitor_leaves_losses_unchanged_and_logs_the_checkpoints_value(tiny_llava, tmp_path, regularizer):
    args = dict(save_strategy="steps", save_steps=2)
    run_entry("plugin", tiny_llava.train_args(tmp_path / "off", **args) + ["--regularizer", regularizer])
    run_entry("plugin", tiny_llava.train_args(tmp_path / "on", **args)
              + ["--regularizer", regularizer, "--language_monitor", "builtin", "--language_monitor_steps", "2"])
    off, on = step_rows(tmp_path / "off"), step_rows(tmp_path / "on")
    assert len(off) == 4 and [r["loss"] for r in on] == [r["loss"] for r in off]
    history = json.loads((tmp_path / "on" / "trainer_state.json").read_text())["log_history"]
    monitored = [r for r in history if "lang_nll" in r]
    assert [r["step"] for r in monitored] == [0, 2, 4]
    assert monitored[2]["lang_nll_delta"] == pytest.approx(monitored[2]["lang_nll"] - monitored[0]["lang_nll"], abs=1e-9)
    # --regularizer none: only the monitor was added (no regularizer's lm_loss)
    assert all(("lm_loss" in r) == (regularizer != "none") for r in on)
    if regularizer != "none":
        return
    ckpt = tmp_path / "on" / "checkpoint-2"
    logged = monitored[1]["lang_nll"]
    # offline, in-process: upstream's own class, the tokenizer as upstream trains (slow)
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer
    model = LlavaLlamaForCausalLM.from_pretrained(ckpt)
    assert language_nll(model, AutoTokenizer.from_pretrained(ckpt, use_fast=False), "builtin") == pytest.approx(logged, rel=1e-5)
    # offline, the CLI: the VLM's LLM extracted and loaded as a plain CausalLM
    p = subprocess.run([sys.executable, "-c", "from vlm_preserve.cli import entry; entry()", "lang-nll", str(ckpt),
                        "--slow-tokenizer"], capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert float(p.stdout.split("lang_nll")[-1]) == pytest.approx(logged, rel=1e-5)


def test_zero3_every_rank_evaluates_and_the_losses_are_unchanged(tmp_path):
    """DeepSpeed ZeRO-3 on 2 CPU ranks (gloo): every parameter is partitioned, so a forward only one rank ran would
    hang the other (the launch has a timeout). With the monitor on every step, the losses equal those of the same
    run without it, and the step-0 value equals the offline metric of the initial (unpartitioned) model."""
    _needs_native()
    pytest.importorskip("deepspeed")
    import transformers
    from helpers.distributed_runs import launch, result, write_data
    data = write_data(tmp_path)
    texts = write_jsonl(tmp_path / "texts.jsonl", TEXTS)
    worker = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              str(ROOT / "tests" / "helpers" / "distributed_worker.py"), "--data", str(data), "--stage", "3", "--regs", "rdd"]
    launch(worker + ["--out", str(tmp_path / "off")], "ZeRO-3 without the monitor")
    launch(worker + ["--out", str(tmp_path / "on"), "--language_monitor", str(texts)], "ZeRO-3 with the monitor")
    off, on = result(tmp_path, "off", "rdd")["rows"], result(tmp_path, "on", "rdd")["rows"]
    losses = [r["loss"] for r in off if "loss" in r]
    assert len(losses) == 2 and [r["loss"] for r in on if "loss" in r] == losses
    monitored = [r for r in on if "lang_nll" in r]
    assert [r["step"] for r in monitored] == [0, 1, 2]
    initial = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "model"))
    assert monitored[0]["lang_nll"] == pytest.approx(language_nll(initial, word_tokenizer(), str(texts)), rel=1e-5)
