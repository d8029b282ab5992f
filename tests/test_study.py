"""The study pipeline (plugin/vlm_preserve/study) on a tiny configuration: scorers on planted examples, data
from the real pinned packages (easy-vqa, EfficientNet-Lite0, chitchat-dataset, gensim's prose, chatterbot-corpus)
and the optional bigbench tarball (planted), caches that rebuild when cut off or stale, and every stage end to end
(projector pretraining, methods through attach(), merge, evaluation, results store, resume, report)."""
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("chitchat_dataset", reason="the study's data packages are installed in the study environment only")
torch = pytest.importorskip("torch")

from vlm_preserve.study import data as D  # noqa: E402
from vlm_preserve.study.evaluate import (choice_outcome, continuation_logliks, mc_eval, mean, paired_bootstrap,  # noqa: E402
                                         perplexity, text_embeds, text_nll)
from vlm_preserve.config import IGNORE_INDEX as IGNORE  # noqa: E402
from vlm_preserve.study.format import Collator, sample  # noqa: E402
from vlm_preserve.study.model import ByteTokenizer, build_vlm, tiny_llm_config  # noqa: E402


def _llm(seed=0):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llm_config()).eval()


def _q(task, n, answer):
    return D.MCQuestion(task, f"question {task} {answer}", [f"choice {i}" for i in range(n)], answer)


# ---- scorers -------------------------------------------------------------------------------------------------
def test_always_correct_scores_one_and_indifferent_scores_chance():
    qs = [_q("t", n, i % n) for i, n in enumerate([2, 3, 4, 5, 2, 4])]
    right = mc_eval(None, None, qs, scorer=lambda q: [1.0 if k == q.answer else 0.0 for k in range(len(q.choices))])
    assert [r["acc"] for r in right] == [1.0] * 6
    flat = mc_eval(None, None, qs, scorer=lambda q: [0.0] * len(q.choices))
    assert [r["acc"] for r in flat] == pytest.approx([1 / len(q.choices) for q in qs])
    wrong = mc_eval(None, None, qs, scorer=lambda q: [0.0 if k == q.answer else 1.0 for k in range(len(q.choices))])
    assert sum(r["acc"] for r in wrong) == 0
    assert choice_outcome([1.0, 3.0, 3.0], 1) == 0.5 and choice_outcome([1.0, 3.0, 3.0], 0) == 0.0


def test_paired_bootstrap():
    a = [1, 0, 1, 1, 0, 1, 1, 0] * 10
    b = [1, 0, 0, 1, 0, 1, 0, 0] * 10
    point, lo, hi = paired_bootstrap(a, b, "diff")
    assert point == pytest.approx(0.25) and lo <= point <= hi and lo > 0
    assert paired_bootstrap(a, a, "diff") == (0.0, 0.0, 0.0)        # paired: identical models, no spread
    r, rlo, rhi = paired_bootstrap(a, b, "ratio")
    assert r == pytest.approx(0.625 / 0.375) and rlo <= r <= rhi
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:-1])


def test_bootstrap_matches_its_definition():
    # the vectorised resampling must give exactly the interval of the plain loop: committed pages depend on it
    import random
    from vlm_preserve.study.evaluate import bootstrap
    a = [random.Random(1).gauss(0, 1) * k for k in range(1, 38)]
    b = [x * 0.3 + k * 1e-3 for k, x in enumerate(a)]
    stat = lambda x: x[0] / x[1] if x[1] else float("nan")  # noqa: E731
    rng, vals = random.Random(3), []
    for _ in range(500):
        idx = [rng.randrange(len(a)) for _ in range(len(a))]
        vals.append(stat([sum(c[i] for i in idx) / len(a) for c in (a, b)]))
    vals = sorted(v for v in vals if v == v)
    want = (stat([mean(a), mean(b)]), vals[int(0.025 * len(vals))], vals[min(len(vals) - 1, int(0.975 * len(vals)))])
    assert bootstrap([a, b], stat, n=500, seed=3) == want


def test_continuation_logliks_match_full_forward():
    """The cached-prompt scorer equals summing log-softmax over a full forward of prompt + continuation."""
    llm, tok = _llm(), ByteTokenizer()
    prompt = tok.encode("<|im_start|>user\nwhat?<|im_end|>\n")
    conts = [tok.encode("a"), tok.encode("bcd"), tok.encode("ef")]
    got = continuation_logliks(llm, text_embeds(llm, prompt), conts)
    for c, g in zip(conts, got):
        ids = torch.tensor([prompt + c])
        logp = llm(ids).logits[0, :-1].log_softmax(-1)
        want = sum(float(logp[len(prompt) - 1 + t, c[t]]) for t in range(len(c)))
        assert g == pytest.approx(want, abs=1e-4)


def test_perplexity_matches_model_loss():
    llm, tok = _llm(), ByteTokenizer()
    texts = ["hello world, a text", "short", "another longer line of text here"]
    rows = text_nll(llm, tok, texts, batch=2)      # padded batches give the same per-text values
    for t, r in zip(texts, rows):
        ids = torch.tensor([tok.encode(t)])
        assert r["tokens"] == ids.shape[1] - 1
        assert r["nll"] / r["tokens"] == pytest.approx(float(llm(ids, labels=ids).loss), rel=1e-4)
    assert perplexity(rows) == pytest.approx(math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)))


# ---- data and model --------------------------------------------------------------------------------------
def _planted_tarball(path, tasks: dict):
    with tarfile.open(path, "w:gz") as t:
        for name, task in tasks.items():
            raw = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _task(n, k=3):
    return {"examples": [{"input": f"Q{i}?", "target_scores": {f"opt{j}": int(j == i % k) for j in range(k)}}
                         for i in range(n)]}


def test_parse_task_and_load_from_tarball(tmp_path):
    task = _task(4)
    task["examples"] += [{"input": "tie", "target_scores": {"a": 1, "b": 1}},      # no single answer: dropped
                         {"input": "generative", "target": "x"}]                  # not multiple choice: dropped
    qs = D.parse_task("t", task)
    assert [q.answer for q in qs] == [0, 1, 2, 0] and qs[1].choices == ["opt0", "opt1", "opt2"]
    tar = tmp_path / "bigbench-1.0.0.tar.gz"
    _planted_tarball(tar, {"t": task, "u": _task(2, 2)})
    got = D.load_tasks(tmp_path, ["t", "u"], tar, sha256=_sha(tar))
    assert len(got["t"]) == 4 and len(got["u"]) == 2 and (tmp_path / "bigbench_tasks.json").exists()
    with pytest.raises(ValueError, match="is not bigbench 1.0.0's"):       # another file than the pinned release
        D.load_tasks(tmp_path, ["t"], tar)
    with pytest.raises(ValueError, match="no such file"):
        D.load_tasks(tmp_path, ["t"], tmp_path / "absent.tar.gz")
    with pytest.raises(ValueError, match="not found"):
        D.load_tasks(tmp_path, ["nope"], tar, sha256=_sha(tar))
    assert D.subsample(list(range(100)), 10) == D.subsample(list(range(100)), 10) and len(D.subsample([1, 2], 5)) == 2


def test_easy_vqa_and_efficientnet_features():
    items, paths = D.easy_vqa_split("test", max_images=2)
    assert len(paths) == 2 and items and all(0 <= it.image < 2 and it.answer in D.easy_vqa_answers() for it in items)
    feats = D.efficientnet_features(paths)
    assert feats.shape == (2, 49, 1280) and feats.dtype == torch.float16 and torch.isfinite(feats.float()).all()
    with pytest.raises(ValueError):
        D.easy_vqa_split("val")


def test_sample_collator_and_image_embedding():
    tok, llm = ByteTokenizer(), _llm()
    vlm = build_vlm(llm, image_token_id=llm.config.vocab_size, vision_dim=8)
    img = sample(tok, "what shape?", "circle", image=1, image_token_id=vlm.config.image_token_id, n_image=3)
    txt = sample(tok, "x" * 500, "yes", max_len=64)
    assert len(txt["input_ids"]) == 64 and txt["labels"][-4:] == tok.encode("yes<|im_end|>")
    sup = [t for t in img["labels"] if t != IGNORE]
    assert sup == tok.encode("circle<|im_end|>") and img["input_ids"].count(vlm.config.image_token_id) == 3
    feats = torch.randn(2, 3, 8)
    batch = Collator(feats, tok.pad_token_id)([img, txt])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 64)
    assert torch.equal(batch["image_features"][0], feats[1]) and not batch["image_features"][1].any()
    emb = vlm.embed(batch["input_ids"], batch["image_features"])
    mask = batch["input_ids"] == vlm.config.image_token_id
    assert torch.allclose(emb[mask], vlm.projector(feats[1]), atol=1e-6)
    assert vlm(**batch).loss.isfinite()
    with pytest.raises(ValueError, match="image tokens"):
        vlm.embed(batch["input_ids"], torch.randn(2, 4, 8))


# ---- the pipeline end to end --------------------------------------------------------------------------------
@pytest.fixture
def tiny_study(tmp_path):
    from vlm_preserve.study.run import StudyConfig

    def make(**kw):
        base = dict(out=str(tmp_path / "out"), data_dir=str(tmp_path), tiny=True, seeds=(0,), train_images=6,
                    test_images=3, vqa_test_questions=6, stage1_steps=2, steps=2, batch=2,
                    instruction_samples=6, save_steps=100, merge_alphas=(0.5,),
                    lora_rank=2, language_validation=3, language_report=4, text_tokens=24,
                    vqa_validation_questions=4)
        return StudyConfig(**{**base, **kw})
    return make


def test_pipeline_end_to_end_and_resume(tiny_study):
    from vlm_preserve.study.report import load_runs, markdown, rows
    from vlm_preserve.study.run import Study
    cfg = tiny_study(methods=("full", "merge", "rdd_rbf", "lora", "distill", "mix", "pre"))
    done = Study(cfg).run()
    assert done == ["base", "full_s0", "merge_a0.5_s0", "rdd_rbf_s0", "lora_s0", "distill_s0", "mix_s0", "pre_s0"]
    out = cfg.out
    rec = json.loads(open(f"{out}/runs/rdd_rbf_s0.json").read())
    assert rec["method"] == "rdd_rbf" and rec["seed"] == 0 and rec["wall_s"] >= 0
    assert "language" not in rec["items"]                            # multiple choice only with a bigbench tarball
    assert len(rec["items"]["chat"]) == 4 and len(rec["items"]["text"]) == 4
    assert all(math.isfinite(r["nll"]) and 0 <= r["p_end1"] <= 1 for r in rec["items"]["chat"])
    assert {"chat_nll", "chat_p_end1", "text_nll"} <= set(rec["summary"]) and "cpu_gflops" in rec
    assert len(rec["items"]["vqa"]) == rec["summary"]["vqa_n"] and 0 <= rec["summary"]["vqa_acc"] <= 1
    assert set(rec["summary"]) >= {"vqa_acc", "vqa_yes_no_acc", "vqa_other_acc"}
    from vlm_preserve.study.data import easy_vqa_answers
    assert {r["pred"] for r in rec["items"]["vqa"]} <= set(easy_vqa_answers())
    assert len(rec["items"]["mechanism"]) == rec["summary"]["vqa_n"] and rec["diagnose"]["layers"][0] == 0
    assert {"mmd2_before", "mmd2_after", "pre_cos"} <= set(rec["summary"])
    assert rec["sources"]["chat"] == "chitchat-dataset==0.9.0" and rec["sources"]["text_wiki"] == "gensim==4.4.0"
    assert any("rdd_loss" in r for r in rec["train_log"])               # the plugin's term reached the Trainer log
    assert any("distill_loss" in r for r in json.loads(open(f"{out}/runs/distill_s0.json").read())["train_log"])
    assert "vqa" not in json.loads(open(f"{out}/runs/base.json").read())["items"]
    assert not any((Study(cfg).out / "ckpt").iterdir())                # checkpoints go once a run is stored
    assert Study(cfg).run() == []                                       # everything stored: nothing reruns
    table = rows(load_runs(f"{out}/runs"))
    assert [r["method"] for r in table][:3] == ["base", "full", "lora"]
    base = table[0]
    assert base["d_chat"] == (0.0, 0.0, 0.0) and base["d_text"] == (0.0, 0.0, 0.0)
    md = markdown(table)
    assert md.count("\n") == len(table) + 2 and "| merge_a0.5 | 0 |" in md


def test_merge_rows_recomputed_from_saved_full_model(tiny_study):
    """A crash between the full run and its merges: the rerun reloads the saved full model for the merges, and
    alpha=1 gives back the base LLM's language scores exactly."""
    from vlm_preserve.study.run import Study
    cfg = tiny_study(methods=("full", "merge"), merge_alphas=(0.0, 1.0))
    Study(cfg).run()
    for a in ("0.0", "1.0"):
        (Study(cfg).path(f"merge_a{a}_s0")).unlink()
    assert Study(cfg).run() == ["merge_a0.0_s0", "merge_a1.0_s0"]
    load = lambda r: [x["nll"] for x in json.loads(Study(cfg).path(r).read_text())["items"]["chat"]]  # noqa: E731
    assert load("merge_a1.0_s0") == pytest.approx(load("base"), abs=1e-4)
    assert load("merge_a0.0_s0") == pytest.approx(load("full_s0"), abs=1e-4)
    assert load("full_s0") != pytest.approx(load("base"), abs=1e-4)


def test_interrupted_run_resumes_from_its_checkpoint(tiny_study, monkeypatch):
    from transformers import TrainerCallback

    from vlm_preserve.study.run import Study
    cfg = tiny_study(methods=("rdd_rbf",), steps=4, save_steps=2)
    seen = {"first_step": [], "interrupt": True}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen["first_step"].append(None)

        def on_step_begin(self, args, state, control, **kw):
            if seen["first_step"][-1] is None:
                seen["first_step"][-1] = state.global_step

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3 and seen["interrupt"]:
                seen["interrupt"] = False
                raise KeyboardInterrupt  # the machine went away after the step-2 checkpoint

    original = Study.trainer

    def trainer(self, *a, **kw):
        tr = original(self, *a, **kw)
        if "rdd" in str(a[2]):
            tr.add_callback(Probe())
        return tr
    monkeypatch.setattr(Study, "trainer", trainer)
    with pytest.raises(KeyboardInterrupt):
        Study(cfg).run()
    assert (Study(cfg).out / "ckpt" / "rdd_rbf_s0" / "checkpoint-2").is_dir()
    assert Study(cfg).run() == ["rdd_rbf_s0"]
    assert seen["first_step"] == [0, 2]                                # the second attempt started at step 2
    rec = json.loads(Study(cfg).path("rdd_rbf_s0").read_text())
    assert rec["train_log"][-1]["step"] == 4


def test_bad_config_is_refused(tiny_study):
    with pytest.raises(ValueError, match="unknown methods"):
        tiny_study(methods=("full", "bogus")).validate()
    with pytest.raises(ValueError, match="merge is computed from the full run"):
        tiny_study(methods=("merge",)).validate()
    with pytest.raises(ValueError, match="no such file"):
        tiny_study(bigbench_tarball="/nonexistent/bigbench-1.0.0.tar.gz").validate()


def test_bigbench_multiple_choice_when_a_tarball_is_given(tiny_study, tmp_path, monkeypatch):
    """The optional input: with --bigbench-tarball the report and validation tasks are scored as multiple choice."""
    from vlm_preserve.study.report import load_runs, rows
    from vlm_preserve.study.run import Study
    tar = tmp_path / "bb.tar.gz"
    _planted_tarball(tar, {n: _task(5) for n in D.REPORT_TASKS + D.VALIDATION_TASKS})
    monkeypatch.setattr(D, "BIGBENCH_SHA256", _sha(tar))
    cfg = tiny_study(methods=("full",), bigbench_tarball=str(tar), report_cap=2, validation_cap=1)
    Study(cfg).run()
    rec = json.loads(Study(cfg).path("full_s0").read_text())
    assert len(rec["items"]["language"]) == 2 * len(D.REPORT_TASKS)
    assert len(rec["items"]["validation"]) == len(D.VALIDATION_TASKS) and "language_acc" in rec["summary"]
    assert rows(load_runs(cfg.out + "/runs"))[0]["retention"][0] == 1.0


def test_study_command_runs_and_reports(tmp_path):
    """`vlm-preserve study` end to end on the tiny model: flags parsed into StudyConfig, runs stored, --report
    writes the markdown table and the plot."""
    from vlm_preserve.cli import main
    out = tmp_path / "out"
    common = ["study", "--out", str(out), "--data-dir", str(tmp_path), "--tiny", "--methods", "full,rdd_linear",
              "--seeds", "0", "--train-images", "4", "--test-images", "2", "--vqa-test-questions", "3",
              "--stage1-steps", "1", "--steps", "1", "--batch", "2",
              "--instruction-samples", "2", "--no-bf16", "--language-validation", "2", "--language-report", "3",
              "--text-tokens", "16"]
    assert main(common) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["base.json", "full_s0.json", "rdd_linear_s0.json"]
    rec = json.loads((out / "runs" / "full_s0.json").read_text())
    assert rec["config"]["bf16"] is False and rec["config"]["steps"] == 1 and rec["summary"]["chat_n"] == 3
    assert main(common + ["--report", str(tmp_path / "table.md")]) == 0
    md = (tmp_path / "table.md").read_text()
    assert "| rdd_linear | 0 |" in md and (tmp_path / "table.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["study", "--out", str(out), "--methods", "full,bogus", "--tiny"])


def test_idle_cores_counts_a_busy_core():
    """Thread choice on CPU: measured now, not from the lagging load average (a core kept busy here counts)."""
    import os
    import threading
    import time as _time

    from vlm_preserve.study.machine import idle_cores
    n = os.cpu_count() or 1
    assert 0 <= idle_cores(0.2) <= n
    stop = _time.time() + 1.0
    busy = threading.Thread(target=lambda: [None for _ in iter(lambda: _time.time() < stop, False)])
    busy.start()
    try:
        assert idle_cores(0.3) <= n - 1 + 0.5  # this process keeps one core busy
    finally:
        busy.join()


# ---- loss-based language metrics ----------------------------------------------------------------------------
def test_reply_nll_matches_full_forward_and_batching():
    from vlm_preserve.study.evaluate import reply_nll
    llm, tok = _llm(), ByteTokenizer()
    pairs = [(tok.encode("<|im_start|>user\nhi<|im_end|>\n"), tok.encode("hello there<|im_end|>")),
             (tok.encode("ab"), tok.encode("cdefgh")), (tok.encode("x"), tok.encode("yz"))]
    rows = reply_nll(llm, pairs, end_id=2, batch=2)
    for (p, r), row in zip(pairs, rows):
        logp = llm(torch.tensor([p + r])).logits[0].log_softmax(-1)
        want = -sum(float(logp[len(p) - 1 + t, r[t]]) for t in range(len(r))) / len(r)
        assert row["nll"] == pytest.approx(want, abs=1e-5) and row["tokens"] == len(r)
        assert row["p_end1"] == pytest.approx(float(logp[len(p), 2].exp()), abs=1e-6)
    assert [r["nll"] for r in reply_nll(llm, pairs, batch=1)] == pytest.approx([r["nll"] for r in rows], abs=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        reply_nll(llm, [([], [1])])


def _closing_model(llm, end_id, bias):
    """The same LLM with `bias` added to the end-of-turn logit everywhere: a model that closes its turn early."""
    import copy
    m = copy.deepcopy(llm)
    with torch.no_grad():
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.clone())  # untie: only the head changes
        m.lm_head.bias = torch.nn.Parameter(torch.zeros(m.config.vocab_size))
        m.lm_head.bias[end_id] = bias
    return m


def test_chat_metric_sees_a_model_that_closes_its_turn_early():
    """Planted: raising the end-of-turn logit makes the reference replies less likely (chat NLL up, paired CI above
    zero) and p(end after the first token) larger; identical models differ by exactly zero, CI containing 0."""
    from vlm_preserve.study.evaluate import chat_pairs, reply_nll
    llm, tok = _llm(), ByteTokenizer()
    items = [{"turns": [["user", f"tell me about thing {i}"]], "reply": f"thing {i} is a fine thing, truly {i * 7}"}
             for i in range(24)]
    pairs = chat_pairs(tok, items)
    base = reply_nll(llm, pairs, end_id=2)
    same = reply_nll(llm, pairs, end_id=2)
    early = reply_nll(_closing_model(llm, 2, 6.0), pairs, end_id=2)
    d, lo, hi = paired_bootstrap([r["nll"] for r in same], [r["nll"] for r in base])
    assert d == 0 and lo <= 0 <= hi
    d, lo, hi = paired_bootstrap([r["nll"] for r in early], [r["nll"] for r in base])
    assert d > 0 and lo > 0
    assert all(e["p_end1"] > b["p_end1"] for e, b in zip(early, base))


def _msg(sender, text):
    return {"sender": sender, "text": text, "timestamp": "t"}


def test_chat_text_and_instruction_items_from_their_packages_formats(tmp_path):
    long = " ".join(["word"] * 16)
    convs = {"b": {"messages": [[_msg("x", "hi there")], [_msg("y", "hello,"), _msg("y", "how are you?")],
                                [_msg("x", "fine, and you?")], [_msg("y", long)], [_msg("x", long + " again")]]},
             "a": {"messages": [[_msg("x", "only one sender"), _msg("x", long)]]},            # no reply: dropped
             "c": {"messages": [[_msg("x", long)], [_msg("y", "short")], [_msg("x", " ".join(["z"] * 100))]]}}
    chat = D.chat_items(convs)
    assert len(chat) == 2                                 # one reply per conversation, ids in sorted order
    assert chat[0]["turns"] == [["user", "hi there"], ["assistant", "hello, how are you?"], ["user", "fine, and you?"]]
    assert chat[0]["reply"] == long                       # the first long turn after the opening one
    assert [r for r, _ in chat[1]["turns"]] == ["user"] and len(chat[1]["reply"].split()) == D.CHAT_MAX_WORDS
    news = tmp_path / "lee.cor"
    news.write_text(" ".join(["news"] * 90) + "\nshort line\n")
    assert D.news_documents(news) == [" ".join(["news"] * 90)]
    import bz2
    para = "The [[river|River Town]] is '''old''' and{{cite|x}} proud<ref>a source</ref>. " + " ".join(["w"] * 85)
    dump = ("<mediawiki><page><title>T</title><ns>0</ns><text>== Heading ==\n" + para + "\n* a list item " +
            " ".join(["l"] * 90) + "\n[[Category:Towns]]\n</text></page><page><title>R</title><ns>0</ns><text>#REDIRECT"
            " [[T]]</text></page><page><title>Talk:T</title><ns>1</ns><text>" + para + "</text></page></mediawiki>")
    (tmp_path / "wiki.bz2").write_bytes(bz2.compress(dump.encode()))
    assert D.wiki_paragraphs(tmp_path / "wiki.bz2") == ["The River Town is old and proud. " + " ".join(["w"] * 85)]
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb" / "x.yml").write_text("categories: [x]\nconversations:\n- - what is a cat\n  - an animal.\n"
                                           "- - lonely line\n")
    assert D.instruction_items(tmp_path / "cb") == [{"question": "what is a cat", "answer": "an animal."}]


def test_the_real_language_sets_are_disjoint_and_sized(tmp_path):
    """From the installed packages: 300 validation and 600 report items of each metric, 2,026 instruction pairs;
    the evaluation sets share no text with each other or with the instructions."""
    sets = D.language_sets(tmp_path, 300, 600)
    assert len(sets["chat"]["validation"]) == len(sets["text"]["validation"]) == 300
    assert len(sets["chat"]["report"]) == len(sets["text"]["report"]) == 600 and len(sets["instructions"]) == 2026
    for part in ("chat", "text"):
        val, rep = (set(map(json.dumps, sets[part][k])) for k in ("validation", "report"))
        assert len(val) == 300 and len(rep) == 600 and not val & rep
    replies = {it["reply"] for k in ("validation", "report") for it in sets["chat"][k]}
    assert not replies & {q["answer"] for q in sets["instructions"]}
    assert all(len(t.split()) >= D.TEXT_MIN_WORDS for k in ("validation", "report") for t in sets["text"][k])


def test_split_items_is_fixed_and_disjoint():
    split = D.split_items(list(range(50)), 10, 30)
    assert len(split["validation"]) == 10 and len(split["report"]) == 30
    assert not set(split["validation"]) & set(split["report"])
    assert D.split_items(list(range(50)), 10, 35)["report"][:30] == split["report"]   # growing keeps items
    with pytest.raises(ValueError, match="pool has 50"):
        D.split_items(list(range(50)), 30, 30)


# ---- the report generator and the sweep's rule, on jsons in the committed format -----------------------------
def _run_json(method, seed, chat, text, vqa, acc=None):
    acc = acc or [1.0, 0.0] * (len(chat) // 2)
    return {"run": f"{method}_s{seed}", "method": method, "seed": seed, "wall_s": 10.0,
            "summary": {"language_acc": sum(acc) / len(acc), "language_n": len(acc), "perplexity": 20.0,
                        **({"vqa_acc": sum(vqa) / len(vqa)} if vqa else {})},
            "items": {"language": [{"task": "t", "acc": a, "logp": -a, "n": 2} for a in acc],
                      "chat": [{"nll": x, "tokens": 10, "p_end1": 0.01} for x in chat],
                      "text": [{"nll": x, "tokens": 20} for x in text],
                      **({"vqa": [{"acc": v, "yes_no": True} for v in vqa]} if vqa else {})}}


def test_report_recovery_and_regeneration_bit_for_bit(tmp_path):
    """Planted per-item scores: a method halfway between Full-Tuning and the base on every item recovers 50% (CI
    exactly 50%); the page's prose outside the generated block survives; a rerun writes the same bytes."""
    from vlm_preserve.study.report import load_runs, rows, write
    base = [1.0 + 0.1 * (i % 7) for i in range(40)]
    full = [b + 1.0 + 0.05 * (i % 5) for i, b in enumerate(base)]
    half = [(b + f) / 2 for b, f in zip(base, full)]
    runs = tmp_path / "runs"
    runs.mkdir()
    recs = [_run_json("base", None, base, base, None), _run_json("full", 0, full, full, [1.0, 0.0] * 20),
            _run_json("full", 1, full, full, [1.0, 1.0] * 20), _run_json("rdd_rbf", 0, half, base, [1.0, 0.0] * 20),
            _run_json("merge_a0.5", 0, half, half, [0.0, 0.0] * 20)]
    for r in recs:
        (runs / f"{r['run']}.json").write_text(json.dumps(r))
    table = {r["method"]: r for r in rows(load_runs(runs))}
    assert table["rdd_rbf"]["rec_chat"] == pytest.approx((0.5, 0.5, 0.5))
    assert table["rdd_rbf"]["rec_text"] == pytest.approx((1.0, 1.0, 1.0))     # text kept at base: all recovered
    d, lo, hi = table["full"]["d_chat"]
    assert d == pytest.approx(1.1) and lo > 0 and table["full"]["seeds"] == [0, 1]
    assert "rec_chat" not in table["full"] and "rec_chat" not in table["base"]
    assert table["full"]["vqa_ci"][0] == pytest.approx(0.75)                   # per-item mean over the two seeds
    md = tmp_path / "results.md"
    md.write_text("# Results\nprose before\n<!-- generated:table -->\nold\n<!-- /generated:table -->\nprose after\n")
    png = write(runs, md)
    page, image = md.read_text(), png.read_bytes()
    assert page.startswith("# Results\nprose before\n") and page.endswith("prose after\n") and "old" not in page
    assert "| rdd_rbf | 0 |" in page and "50% [50%, 50%]" in page and len(image) > 1000
    write(runs, md)
    assert md.read_text() == page and png.read_bytes() == image


def test_sweep_rule_picks_the_smallest_admitted_setting(tmp_path):
    from vlm_preserve.study import sweep
    d = tmp_path / "sweep"
    d.mkdir()
    n = 30
    base = [1.0 + 0.01 * i for i in range(n)]

    def rec(lr, step, shift, vqa, losses):
        items = {"chat": [{"nll": b + shift + 0.02 * (i % 3 - 1), "p_end1": 0.1} for i, b in enumerate(base)],
                 "text": [{"nll": b} for b in base], "vqa": [{"acc": float(i < vqa * n)} for i in range(n)]}
        (d / f"lr{lr:g}_step{step}.json").write_text(json.dumps(
            {"lr": lr, "step": step, "items": items, "train_log": [{"loss": x} for x in losses]}))
    (d / "base.json").write_text(json.dumps({"items": {"chat": [{"nll": b, "p_end1": 0.0} for b in base],
                                                       "text": [{"nll": b} for b in base],
                                                       "vqa": [{"acc": 0.0}] * n}}))
    rec(1e-4, 25, 0.0, 0.5, [2.0, 1.0])       # no degradation
    rec(1e-4, 50, 0.3, 0.8, [2.0, 1.0])       # admitted, drift 5e-3
    rec(1e-3, 25, 0.5, 0.5, [2.0, 1.0])       # degraded, but easy-vqa still climbing (0.8 later): not plateaued
    rec(1e-3, 50, 0.5, 0.8, [2.0, 1.0])       # admitted, drift 5e-2
    rec(3e-4, 25, 0.4, 0.9, [2.0, float("nan")])   # diverged
    rows = sweep.summarize(*sweep.load(d))
    by = {(r["lr"], r["step"]): r for r in rows}
    assert not by[(1e-4, 25)]["degraded"] and by[(1e-3, 25)]["degraded"] and not by[(1e-3, 25)]["plateaued"]
    assert by[(3e-4, 25)]["diverged"] and not by[(3e-4, 25)]["admitted"]
    chosen = sweep.choose(rows)
    assert (chosen["lr"], chosen["step"]) == (1e-4, 50)
    assert sweep.choose_strong(rows) is None                              # no admitted setting lost >= 1 nat
    rec(1e-3, 100, 1.2, 0.8, [2.0, 1.0])      # admitted and >= STRONG: the strong regime
    rec(3e-4, 100, 1.1, 0.9, [2.0, 1.0])      # also, with a smaller drift (3e-2)
    rows = sweep.summarize(*sweep.load(d))
    strong = sweep.choose_strong(rows)
    assert (strong["lr"], strong["step"]) == (3e-4, 100) and sweep.choose(rows)["lr"] == 1e-4
    md = tmp_path / "s.md"
    assert sweep.report(d, md) == chosen and "50 **chosen**" in md.read_text()


def test_batched_scoring_equals_one_prompt_at_a_time():
    """Left-padded prompts of different lengths with their own continuations score as each prompt alone."""
    from vlm_preserve.study.evaluate import batch_continuation_logliks
    llm, tok = _llm(), ByteTokenizer()
    prompts = ["<|im_start|>user\nwhat?<|im_end|>\n", "a much longer prompt than the first one", "xy"]
    conts = [[tok.encode("a"), tok.encode("bcd")], [tok.encode("ef"), tok.encode("g"), tok.encode("hijkl")],
             [tok.encode("mn")]]
    got = batch_continuation_logliks(llm, [text_embeds(llm, tok.encode(p))[0] for p in prompts], conts)
    for p, cs, g in zip(prompts, conts, got):
        assert g == pytest.approx(continuation_logliks(llm, text_embeds(llm, tok.encode(p)), cs), abs=1e-4)
        for c, v in zip(cs, g):   # and as a plain full forward
            ids = tok.encode(p)
            logp = llm(torch.tensor([ids + c])).logits[0].log_softmax(-1)
            assert v == pytest.approx(sum(float(logp[len(ids) - 1 + t, c[t]]) for t in range(len(c))), abs=1e-4)


def test_demo_prints_degradation_recovery_and_time_left(tmp_path, capsys):
    from vlm_preserve.cli.demo import demo
    assert demo(str(tmp_path / "out"), data_dir=str(tmp_path), tiny=True, train_images=6, test_images=3,
                vqa_test_questions=4, stage1_steps=1, steps=2, batch=2,
                language_validation=2, language_report=4, text_tokens=16, vqa_validation_questions=2,
                instruction_samples=2, bf16=False) == 0
    out = capsys.readouterr().out
    for phase in ("eval:base (1/9)", "stage1 (2/9)", "train:full_s0 (3/9)", "eval:merge_a0.5_s0 (5/9)",
                  "eval:lora_s0 (7/9)", "eval:distill_s0 (9/9)"):
        assert f"[demo] {phase}" in out and "min left" in out
    table = out.split("[demo] language against the base LLM")[1]
    assert "4 chat replies, 4 prose documents" in table
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"base", "full", "merge_a0.5", "lora", "distill"}
    assert "%" in rows["distill"].split(" | ")[2] and "%" in rows["merge_a0.5"].split(" | ")[2]   # recovery


def test_seed_rows_compare_each_run_with_the_same_seeds_full_run():
    """Seed-to-seed variation, which the seed-averaged table's item CIs leave out: each run on its own, recovery
    against the Full-Tuning run of its own seed."""
    from vlm_preserve.study.report import seed_markdown, seed_rows

    def rec(method, seed, chat, text=(1.0, 1.0)):
        return {"method": method, "seed": seed, "summary": {"vqa_acc": 0.5},
                "items": {"chat": [{"nll": x} for x in chat], "text": [{"nll": x} for x in text]}}
    runs = {"base": [rec("base", None, (1.0, 1.0))],
            "full": [rec("full", 0, (2.0, 2.0)), rec("full", 1, (3.0, 3.0))],
            "distill": [rec("distill", 0, (1.5, 1.5)), rec("distill", 1, (1.5, 1.5))],
            "lora": [rec("lora", 0, (1.2, 1.2))]}                       # one seed: not in the block
    out = seed_rows(runs)
    assert [(r["method"], r["seed"]) for r in out] == [("full", 0), ("full", 1), ("distill", 0), ("distill", 1)]
    d0, d1 = out[2], out[3]
    assert d0["d_chat"][0] == pytest.approx(0.5) and d0["rec_chat"][0] == pytest.approx(0.5)    # (1.5-2)/(1-2)
    assert d1["rec_chat"][0] == pytest.approx(0.75)                                             # (1.5-3)/(1-3)
    md = seed_markdown(out)
    assert "| distill | 2 | +0.500 ± 0.000 | 62% ± 18% |" in md
    # unpaired, against Full-Tuning's seed mean 2.5: (2.5 - 1.5) / (2.5 - 1); text lost nothing, so no recovery
    assert d0["rec_chat_pooled"] == pytest.approx(2 / 3) and "rec_text_pooled" not in d0
    assert "| 67% ± 0% / — |" in md


def test_table_recovery_compares_with_the_full_runs_of_the_same_seeds():
    from vlm_preserve.study.report import rows

    def rec(method, seed, chat):
        return {"method": method, "seed": seed, "wall_s": 1.0,
                "summary": {"language_acc": 0.5, "perplexity": 1.0, "language_n": 1},
                "items": {"language": [{"acc": 1.0, "logp": -1.0}], "chat": [{"nll": x, "p_end1": 0.0} for x in chat]}}
    runs = {"base": [rec("base", None, (1.0, 1.0))],
            "full": [rec("full", 0, (2.0, 2.0)), rec("full", 1, (4.0, 4.0))],
            "lora": [rec("lora", 0, (1.5, 1.5))]}
    lora = next(r for r in rows(runs) if r["method"] == "lora")
    assert lora["rec_chat"][0] == pytest.approx(0.5)   # against full seed 0 (2.0), not the seeds' mean (3.0)


# ---- sources by package name, and caches that cannot lie ------------------------------------------------------
def test_a_missing_or_changed_source_stops_with_one_line_naming_package_version_and_command(tiny_study, monkeypatch):
    from vlm_preserve.study import sources as S
    from vlm_preserve.study.run import Study
    real = S.SOURCES["chat"]
    monkeypatch.setitem(S.SOURCES, "chat", S.Source("chitchat-dataset-gone", "0.9.0", "chitchat_dataset_gone",
                                                    "dataset.json", real.sha256, "MIT"))
    with pytest.raises(SystemExit) as e:
        Study(tiny_study(methods=("full",)))
    msg = str(e.value)
    assert "\n" not in msg and "chitchat-dataset-gone==0.9.0" in msg and "is not installed" in msg
    assert "pip install chitchat-dataset-gone==0.9.0" in msg and "scripts/setup_env.sh study" in msg
    monkeypatch.setitem(S.SOURCES, "chat", S.Source(real.package, "0.8.0", real.module, real.relpath, real.sha256,
                                                    real.licence))
    with pytest.raises(S.SourceError, match=r"version 0\.9\.0 is installed, the study is pinned to 0\.8\.0"):
        S.path("chat")
    monkeypatch.setitem(S.SOURCES, "chat", S.Source(real.package, real.version, real.module, real.relpath, "0" * 64,
                                                    real.licence))
    with pytest.raises(S.SourceError, match="its content changed; reinstall it with pip install "
                                            r"chitchat-dataset==0\.9\.0 --force-reinstall"):
        S.path("chat")


def test_the_missing_package_message_from_the_command_line(tmp_path):
    """The same line from `vlm-preserve demo` in a process where one source's package cannot be found."""
    hide = ("import importlib.util as u; f = u.find_spec; "
            "u.find_spec = lambda n, *a, **k: None if n == 'chitchat_dataset' else f(n, *a, **k); "
            "from vlm_preserve.cli import main; raise SystemExit(main())")
    r = subprocess.run([sys.executable, "-c", hide, "demo", "--tiny", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "chitchat-dataset==0.9.0 (chat source) is not installed: pip install chitchat-dataset==0.9.0" in last
    assert not (tmp_path / "o" / "runs" / "base.json").exists()


_KILLED_BUILD = """
import sys, time
from pathlib import Path
from vlm_preserve.study.cache import cached
def build(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half of it")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
        f.write(b" and the rest")
cached(Path(sys.argv[1]), {"source": "abc"}, build)
"""


def test_a_cache_build_killed_midway_is_rebuilt_and_never_trusted(tmp_path):
    from vlm_preserve.study.cache import cached, problem
    target = tmp_path / "c" / "set.json"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(target)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout.readline().strip() == "writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert not target.exists() and list(target.parent.glob("set.json.tmp-*"))   # only the temporary file is left
    built = []
    p = cached(target, {"source": "abc"}, lambda tmp: (built.append(1), tmp.write_text("[1, 2]")))
    assert built and json.loads(p.read_text()) == [1, 2] and not list(target.parent.glob("*.tmp-*"))
    assert problem(target, {"source": "abc"}) is None
    assert cached(target, {"source": "abc"}, lambda tmp: built.append(2)) == target and built == [1]   # trusted


def test_truncated_stale_or_unmanifested_caches_are_rebuilt_with_a_line(tmp_path, capsys):
    from vlm_preserve.study.cache import cached
    items, feats = D.cached_features(tmp_path, "test", 2)
    cache = tmp_path / "easyvqa_test_2_s0.pt"
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])                        # truncated (a disk filled, a copy cut off)
    capsys.readouterr()
    _, again = D.cached_features(tmp_path, "test", 2)
    assert "does not match its manifest's sha256 (truncated" in capsys.readouterr().out
    assert torch.equal(again, feats) and cache.read_bytes() == data
    target = tmp_path / "x.json"
    cached(target, {"source": "v1"}, lambda tmp: tmp.write_text("1"))
    cached(target, {"source": "v2"}, lambda tmp: tmp.write_text("2"))   # its source changed: stale
    assert "was built from other inputs (source)" in capsys.readouterr().out and target.read_text() == "2"
    (tmp_path / "x.json.manifest").unlink()                            # e.g. killed between the two renames
    cached(target, {"source": "v2"}, lambda tmp: tmp.write_text("3"))
    assert "has no manifest" in capsys.readouterr().out and target.read_text() == "3"


def test_nothing_in_the_package_downloads_a_file():
    """Every input comes from a package installed by name (study/sources.py): no URL fetch anywhere in plugin/."""
    import pathlib
    import re
    root = pathlib.Path(D.__file__).resolve().parents[1]
    pattern = re.compile(r"urlopen|urlretrieve|requests\.get|urllib\.request|httpx\.get|wget")
    hits = [f"{p}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert len(list(root.rglob("*.py"))) > 30 and hits == []


def test_selection_rule_best_admitted_recovery_tie_to_default_none_admitted_keeps_default(tmp_path):
    from vlm_preserve.study import select
    d = tmp_path / "select"
    d.mkdir()
    n = 20
    base = [1.0 + 0.01 * i for i in range(n)]

    def rec(method, setting, chat, text, vqa):
        items = {"chat": [{"nll": b + chat, "p_end1": 0.1} for b in base], "text": [{"nll": b + text} for b in base],
                 "vqa": [{"acc": float(i < vqa * n)} for i in range(n)]}
        name = "base" if method == "base" else select.tag(method, setting)
        (d / f"{name}.json").write_text(json.dumps({"method": method, "setting": setting, "items": items}))
    rec("base", {}, 0.0, 0.0, 0.3)
    rec("full", {}, 1.0, 0.2, 0.70)
    rec("rdd_rbf", {"rdd_weight": 1.0}, 0.5, 0.1, 0.70)       # score 50%
    rec("rdd_rbf", {"rdd_weight": 0.1}, 0.9, 0.2, 0.70)       # 5%
    rec("rdd_rbf", {"rdd_weight": 10.0}, 0.0, 0.0, 0.60)      # 100%, but easy-vqa 0.10 below Full-Tuning's
    rec("pre", {"pre_weight": 0.5}, 0.5, 0.1, 0.70)           # 50%
    rec("pre", {"pre_weight": 5.0}, 0.6, 0.0, 0.70)           # (40% + 100%) / 2 = 70%: chosen
    rec("mix", {"mix_fraction": 0.2}, 0.5, 0.1, 0.70)         # 50%
    rec("mix", {"mix_fraction": 0.5}, 0.5, 0.1, 0.70)         # a tie: the default stays
    rec("lora", {"lora_rank": 16}, 0.2, 0.0, 0.50)            # none admitted: the default, marked not admitted
    rec("lora", {"lora_rank": 64}, 0.1, 0.0, 0.40)
    chosen = select.choose(select.summarize(*select.load(d)))
    assert {m: r["setting"] for m, r in chosen.items()} == {
        "rdd_rbf": {"rdd_weight": 1.0}, "pre": {"pre_weight": 5.0}, "mix": {"mix_fraction": 0.2},
        "lora": {"lora_rank": 16}}
    assert chosen["pre"]["score"] == pytest.approx(0.7) and not chosen["lora"]["admitted"]
    md = tmp_path / "r.md"
    assert select.report(d, md, "strong") == select.chosen_settings(d)
    page = md.read_text()
    assert "pre_weight=5 **chosen**" in page and "| rdd_rbf | rdd_weight=10 | " in page and "| no |" in page
    assert "Not yet run (" in page and "`rdd_l2`" in page and "`pre__pre_weight=5`" not in page.split("Not yet run")[1]
    before = page
    select.report(d, md, "strong")
    assert md.read_text() == before                                          # regenerated: the same bytes
    from vlm_preserve.study.run import Study, StudyConfig
    settings = Study(StudyConfig(out=str(tmp_path / "out"), select_dir=str(d), tiny=True)).settings()
    assert settings["rdd_pre"] == {"rdd_weight": 1.0, "pre_weight": 5.0}   # each term at its own choice


def test_a_run_stopped_early_is_the_longer_schedules_checkpoint(tiny_study):
    """The mild regime is 30 steps of a 100-step cosine: a run stopped at step k has the weights the longer run had
    at step k (same batches, same learning rates), and the sweep measured exactly that."""
    from transformers import TrainerCallback

    from vlm_preserve.study.run import Study
    study = Study(tiny_study(methods=("full",)))
    seen = {}

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                seen.update({k: v.detach().clone() for k, v in model.llm.state_dict().items()})
    study.stage2("full", 0, steps=4, lr=1e-3, schedule=4, callbacks=[Keep()], run="long")
    short, history, _ = study.stage2("full", 0, steps=2, lr=1e-3, schedule=4, run="short")
    assert seen and max(x["step"] for x in history if "loss" in x) == 2
    assert all(torch.equal(seen[k], v) for k, v in short.llm.state_dict().items())
    with pytest.raises(ValueError, match="schedule"):
        tiny_study(steps=5, schedule_steps=4).validate()


def test_the_studys_default_regime_is_the_mild_one_the_pilot_chose():
    from vlm_preserve.study.run import StudyConfig
    from vlm_preserve.study.sweep import REGIMES
    c = StudyConfig(out="x")
    assert {k: getattr(c, k) for k in REGIMES["mild"]} == REGIMES["mild"]


def test_a_setting_reaches_the_regularizer_or_the_study_and_a_bad_one_is_refused():
    from vlm_preserve.regularizers import PReConfig, RDDConfig
    from vlm_preserve.study.run import split_setting
    configs, study = split_setting({"rdd_weight": 0.1, "pre_layer": "7", "mix_fraction": 0.5})
    assert sorted(type(c).__name__ for c in configs) == ["PReConfig", "RDDConfig"] and study == {"mix_fraction": 0.5}
    assert next(c for c in configs if isinstance(c, RDDConfig)).rdd_weight == 0.1
    assert next(c for c in configs if isinstance(c, PReConfig)).pre_layer == "7"
    with pytest.raises(ValueError, match="rdd_wieght"):
        split_setting({"rdd_wieght": 1.0})


# ---- does a method move its own quantity (study/mechanism.py) -----------------------------------------------
def _mechanism_vlm():
    from types import SimpleNamespace
    tok, llm = ByteTokenizer(), _llm()
    vlm = build_vlm(llm, image_token_id=llm.config.vocab_size, vision_dim=8, seed=0).eval()
    feats = torch.randn(12, 3, 8, generator=torch.Generator().manual_seed(1))
    items = [SimpleNamespace(question=f"what shape is number {i}?", image=i) for i in range(12)]
    return tok, vlm, feats, items


def _moved(vlm, scale: float, bias: float = 0.0):
    import copy
    m = copy.deepcopy(vlm)
    w = m.projector[2].weight
    with torch.no_grad():
        w.add_(scale * w.abs().mean() * torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
        m.projector[2].bias.add_(bias)
    return m


def test_mechanism_of_identical_models_is_zero_with_a_ci_containing_zero():
    from vlm_preserve.study.mechanism import measure, pre_layer
    tok, vlm, feats, items = _mechanism_vlm()
    rows, diag = measure(vlm, _moved(vlm, 0.0), tok, items, feats)
    assert len(rows) == 12 and all(r["mmd2_before"] > 0 for r in rows)   # the quantity itself is there, not 0
    d = paired_bootstrap([r["mmd2_after"] for r in rows], [r["mmd2_before"] for r in rows])
    assert d[0] == 0 and d[1] <= 0 <= d[2]
    assert [r["pre_cos"] for r in rows] == pytest.approx([1.0] * 12, abs=1e-5)
    assert diag["layers"] == [0, pre_layer(2)] and diag["before"] == diag["after"]
    assert set(diag["after"]) == {"mixing", "effdim", "redundancy"}


def test_moved_visual_features_score_lower_on_the_pre_quantity_and_a_wider_gap_higher_on_rdds():
    from vlm_preserve.study.mechanism import measure
    tok, vlm, feats, items = _mechanism_vlm()
    cos = [mean(r["pre_cos"] for r in measure(_moved(vlm, s), vlm, tok, items, feats)[0]) for s in (0.0, 0.5, 3.0)]
    assert cos[0] == pytest.approx(1.0, abs=1e-5) and cos[0] > cos[1] > cos[2]
    rows, _ = measure(_moved(vlm, 0.0, bias=3.0), vlm, tok, items, feats)   # visual tokens pushed off the text
    d = paired_bootstrap([r["mmd2_after"] for r in rows], [r["mmd2_before"] for r in rows])
    assert d[1] > 0


def test_the_mechanism_table_compares_before_after_and_with_the_same_seeds_full_run(tmp_path):
    from vlm_preserve.study.report import mechanism_markdown, mechanism_rows
    vqa = [{"acc": a, "yes_no": yn} for a, yn in [(1, True), (0, True), (1, False), (1, False)]]

    def rec(method, seed, after, cos, vqa=vqa):
        mech = [{"mmd2_before": 1.0, "mmd2_after": a, "pre_cos": c} for a, c in zip(after, cos)]
        diag = {"layers": [0, 2], **{w: {"mixing": {"pairwise_distance": [v, 0.0], "mmd2": [0.0, 0.0]},
                                         "effdim": {"effective_dim": [0, v]}, "redundancy": {"redundancy": [0, v]}}
                                     for w, v in (("before", 1.0), ("after", 2.0))}}
        return {"method": method, "seed": seed, "items": {"vqa": vqa, "mechanism": mech}, "diagnose": diag}
    runs = {"base": [{"method": "base", "seed": None, "items": {}}],
            "full": [rec("full", 0, [1.0] * 4, [0.5] * 4)],
            "rdd_rbf": [rec("rdd_rbf", 0, [0.4, 0.5, 0.6, 0.5], [0.5] * 4,
                            [{**v, "pred": p} for v, p in zip(vqa, ["no", "no", "red", "no"])])]}
    rows_ = mechanism_rows(runs)
    assert [r["method"] for r in rows_] == ["full", "rdd_rbf"]
    full, rdd = rows_
    assert full["d_mmd2"] == (0.0, 0.0, 0.0) and "mmd2_vs_full" not in full
    assert rdd["d_mmd2"][0] == pytest.approx(-0.5) and rdd["d_mmd2"][2] < 0
    assert rdd["mmd2_vs_full"][0] == pytest.approx(-0.5) and rdd["cos_vs_full"] == (0.0, 0.0, 0.0)
    assert rdd["vqa_yes_no"][0] == 0.5 and rdd["vqa_other"][0] == 1.0
    assert rdd["effdim"] == (1.0, 2.0) and rdd["dist0"] == (1.0, 2.0)
    assert rdd["vqa_pred"] == (2, "no", 0.75) and "vqa_pred" not in full   # full's items predate stored answers
    md = mechanism_markdown(rows_)
    assert md.count("\n") == 4 and "| rdd_rbf | 0 | -0.500 [" in md and "1 → 2" in md
    assert md.splitlines()[2].endswith("| — |") and md.splitlines()[3].endswith("| 2, no (75%) |")


def test_auto_merge_rows_follow_the_rule_on_validation_and_draw_their_curve(tiny_study, tmp_path):
    from vlm_preserve.offline.merge_auto import choose
    from vlm_preserve.study.report import write
    from vlm_preserve.study.run import Study
    cfg = tiny_study(methods=("full", "mix"), merge_sources=("full", "mix"), keep_models=True, merge_grid=(0.5, 1.0))
    assert Study(cfg).run() == ["base", "full_s0", "mix_s0", "merge_full_s0", "merge_mix_s0"]
    rec = json.loads(Study(cfg).path("merge_full_s0").read_text())
    m = rec["merge"]
    assert rec["method"] == "merge_full" and [p["alpha"] for p in m["curve"]] == [0.5, 1.0]
    chosen = choose([dict(p) for p in m["curve"]], m["reference"]["vqa"], 0.01)
    assert m["alpha"] == (chosen["alpha"] if chosen else 0.0)
    assert len(rec["items"]["chat"]) == 4 and len(rec["items"]["mechanism"]) == rec["summary"]["vqa_n"]
    md = tmp_path / "page.md"
    md.write_text("<!-- generated:table -->\n<!-- /generated:table -->\n<!-- generated:merge -->\n"
                  "<!-- /generated:merge -->\n<!-- generated:mechanism -->\n<!-- /generated:mechanism -->\n")
    write(Path(cfg.out) / "runs", md)
    page = md.read_text()
    assert "| merge_full | full_s0 |" in page and "| merge_mix | mix_s0 |" in page and "| merge_full | 0 |" in page
    assert (tmp_path / "page-merge" / "merge_full_s0.png").read_bytes()[:4] == b"\x89PNG"
    first, png = md.read_bytes(), (tmp_path / "page-merge" / "merge_mix_s0.png").read_bytes()
    write(Path(cfg.out) / "runs", md)
    assert md.read_bytes() == first and (tmp_path / "page-merge" / "merge_mix_s0.png").read_bytes() == png


def test_auto_merge_retrains_a_source_whose_model_was_not_kept(tiny_study, capsys):
    from vlm_preserve.study.run import Study
    Study(tiny_study(methods=("full",))).run()
    cfg = tiny_study(methods=("full",), merge_sources=("full",))
    model = Path(cfg.out) / "models" / "full_s0.safetensors"
    assert not model.exists()
    before = Study(cfg).path("full_s0").read_bytes()
    assert Study(cfg).run() == ["merge_full_s0"]
    out = capsys.readouterr().out
    assert "full_s0: its model was not kept; retraining it" in out and "training losses within 0.00%" in out
    assert model.exists() and Study(cfg).path("full_s0").read_bytes() == before   # the committed json untouched


def test_a_refused_retrain_leaves_no_checkpoint_to_resume_from(tiny_study):
    """The committed json's losses planted 2x off: the retrain is refused, and its checkpoint is gone, so a later
    fresh run of the same name starts over instead of resuming the refused training."""
    from vlm_preserve.study.run import Study
    Study(tiny_study(methods=("full",))).run()
    cfg = tiny_study(methods=("full",), merge_sources=("full",))
    path = Study(cfg).path("full_s0")
    rec = json.loads(path.read_text())
    assert rec["train_log"], "the run logged no training losses"
    for r in rec["train_log"]:
        r["loss"] *= 2
    path.write_text(json.dumps(rec))
    with pytest.raises(RuntimeError, match="did not reproduce its committed training losses"):
        Study(cfg).run()
    assert not (Path(cfg.out) / "ckpt" / "full_s0").exists()
    assert not (Path(cfg.out) / "models" / "full_s0.safetensors").exists()


def test_auto_merge_of_a_method_never_run_says_what_to_add(tiny_study):
    from vlm_preserve.study.run import Study
    with pytest.raises(RuntimeError, match="mix_s0 has not been run.*add mix to --methods"):
        Study(tiny_study(methods=("full",), merge_sources=("mix",))).run()


def test_recommendation_ranks_rows_and_says_which_keep_language(tmp_path):
    """Planted runs: a method that recovers everything in each seed `keeps`, one at Full-Tuning's loss is `no`, one
    that recovers a little in every seed is `partly`; the order is by recovery, the flags are the row's setting."""
    from vlm_preserve.study.report import recommend_markdown, write_recommendation
    n = 30
    base = [1.0 + 0.01 * i for i in range(n)]

    def rec(method, seed, loss, vqa=0.7, setting=None):
        noise = [0.002 * ((i * 7 + seed) % 5) for i in range(n)]
        items = {"chat": [{"nll": b + loss + e, "p_end1": 0.1} for b, e in zip(base, noise)],
                 "text": [{"nll": b + loss / 2 + e} for b, e in zip(base, noise)],
                 "vqa": [{"acc": float(i < vqa * n), "yes_no": True} for i in range(n)]}
        return {"method": method, "seed": seed, "setting": setting or {}, "items": items,
                "summary": {"vqa_acc": vqa}, "wall_s": 1.0}
    runs = {"base": [{"method": "base", "seed": None, "items": rec("base", 0, 0.0)["items"],
                      "summary": {}, "wall_s": 1.0}],
            "full": [rec("full", s, 1.0) for s in (0, 1)],
            "distill": [rec("distill", s, 0.0, setting={"distill_weight": 1.0}) for s in (0, 1)],
            "rdd_rbf": [rec("rdd_rbf", s, 1.0, vqa=0.9) for s in (0, 1)],
            "pre": [rec("pre", s, 0.8, setting={"pre_weight": 0.05}) for s in (0, 1)]}
    md = recommend_markdown(runs)
    lines = md.splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["distill", "pre", "rdd_rbf"]
    assert lines[0].startswith("| `--regularizer distill --distill_weight 1` |") and "| keeps |" in lines[0]
    assert "| partly |" in lines[1] and "`--regularizer pre --pre_weight 0.05`" in lines[1]
    assert "| no |" in lines[2] and "(higher)" in lines[2] and "(level)" in lines[0]
    # unpaired, against Full-Tuning's seed mean: all of the loss recovered, and none of it
    assert "| 100% ± 0% / 100% ± 0% |" in lines[0] and "| 0% ± 0% / 0% ± 0% |" in lines[2]
    page = tmp_path / "README.md"
    page.write_text("no block here\n")
    with pytest.raises(ValueError, match="has no <!-- generated:recommend --> block"):
        write_recommendation(tmp_path, page)
