"""`vlm-preserve eval-language` end to end on tiny models with a local multiple-choice task (lm-eval cannot
download datasets here): the base LLM and two VLMs, one of them merged back towards the base."""
import json

import pytest

from helpers.checkpoint_models import base_llm, build_vlm
from vlm_preserve.cli import main

pytest.importorskip("lm_eval", reason="lm-eval is installed in the transformers environment only")

QUESTIONS = [("What colour is the sky on a clear day?", ["blue", "green", "red"], 0),
             ("How many sides has a triangle?", ["four", "three", "five"], 1),
             ("Which is a shape?", ["circle", "answer", "please"], 0),
             ("Which is largest?", ["small", "one", "large"], 2)] * 3


def write_task(folder):
    data = folder / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS) + "\n")
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")


def test_eval_language_end_to_end(tmp_path, monkeypatch, capsys):
    from PIL import Image
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = base_llm(tmp_path / "base")
    vlm = build_vlm("native-new", tmp_path / "vlm", base)
    assert main(["merge", "--vlm", str(vlm), "--base-llm", str(base), "--alpha", "0.5", "--out",
                 str(tmp_path / "merged"), "--no-progress"]) == 0
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks)
    out = tmp_path / "report"
    assert main(["eval-language", "--base", str(base), "--vlm", str(vlm), str(tmp_path / "merged"),
                 "--tasks", "tiny_mc", "--include-path", str(tasks), "--out", str(out)]) == 0
    res = json.loads((out / "language_eval.json").read_text())
    assert res["base"] == "base" and res["vlms"] == ["vlm", "merged"]
    rows = {r["metric"]: r for r in res["rows"]}
    assert set(rows) == {"acc", "acc_norm"}
    for r in rows.values():
        for label in ("base", "vlm", "merged"):
            assert 0 <= r[label] <= 1 and (r[label] * len(QUESTIONS)).is_integer()
        assert r["delta vlm"] == pytest.approx(r["vlm"] - r["base"])
        assert r["delta merged"] == pytest.approx(r["merged"] - r["base"])
    md = (out / "language_eval.md").read_text()
    assert "| task | metric | base | vlm | merged | delta vlm | delta merged |" in md and "| tiny_mc | acc |" in md
    img = Image.open(out / "language_eval.png").convert("L")
    assert img.size[0] >= 300 and img.size[1] >= 200
    lo, hi = img.getextrema()
    assert hi - lo > 100 and len(img.getcolors(1 << 16)) > 10  # something drawn, not a blank canvas
    assert (out / "llms" / "vlm" / "config.json").is_file()


def test_missing_dependency_says_what_to_install(tmp_path, monkeypatch, capsys):
    import builtins
    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib":
            raise ImportError("No module named 'matplotlib' (simulated)")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["eval-language", "--base", str(tmp_path), "--vlm", str(tmp_path), "--tasks", "arc_easy",
                 "--out", str(tmp_path / "o")]) == 2
    assert "eval-language needs matplotlib, which is not installed: pip install 'vlm-preserve-plugin[eval]'" \
        in capsys.readouterr().err
