"""`vlm-preserve merge --alpha auto` on tiny checkpoints written at test time, with a planted VQA evaluation (a
script whose score is a known function of the merge's α): the chosen α is the one the rule implies, the curve,
the PNG and the chosen model are written, no merge is chosen where none keeps VQA, bad input fails clearly."""
import json
import sys

import pytest

from helpers.checkpoint_models import base_llm, build_vlm
from vlm_preserve.cli import main
from vlm_preserve.offline.merge_auto import choose, pareto

# the planted VQA score: slope * alpha below 0.8 (the VLM itself, with no merge recipe, is alpha 0)
PLANTED = """import json, sys
from pathlib import Path
recipe = Path(sys.argv[1]) / "vlm_preserve_merge.json"
alpha = json.loads(recipe.read_text())["alpha"] if recipe.exists() else 0.0
print("evaluating", sys.argv[1])
print(0.8 - float(sys.argv[2]) * alpha)
"""


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    base = base_llm(root / "base")
    script = root / "planted_vqa.py"
    script.write_text(PLANTED)
    return base, build_vlm("llava", root / "vlm", base), script


def auto(ckpts, out, slope, *extra):
    base, vlm, script = ckpts
    return main(["merge", "--vlm", str(vlm), "--base-llm", str(base), "--out", str(out), "--no-progress",
                 "--alpha", "auto", "--auto-alphas", "0.25,0.5,1", "--vqa-eval",
                 f"{sys.executable} {script} {{model}} {slope}", *extra])


def implied(rec):
    ok = [p for p in rec["points"] if p["vqa"] >= rec["vqa_vlm"] - rec["budget"]]
    return max(ok, key=lambda p: (p["recovery"], -p["alpha"]))["alpha"] if ok else None


def test_the_chosen_alpha_is_the_one_the_rule_implies(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert auto(ckpts, out, "0.02") == 0          # VQA drops 0.02 per unit of alpha: 0.25 and 0.5 within 0.01
    rec = json.loads((out / "merge_auto.json").read_text())
    assert [p["alpha"] for p in rec["points"]] == [0.25, 0.5, 1.0] and rec["vqa_vlm"] == pytest.approx(0.8)
    assert [p["admitted"] for p in rec["points"]] == [True, True, False]
    assert rec["nll_vlm"] > rec["nll_base"] and all(p["lang_nll"] > 0 for p in rec["points"])
    assert rec["chosen"]["alpha"] == implied(rec) and implied(rec) in (0.25, 0.5)
    recipe = json.loads((out / "model" / "vlm_preserve_merge.json").read_text())
    assert recipe["alpha"] == rec["chosen"]["alpha"] and (out / "model" / "config.json").exists()
    assert (out / "merge_auto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["merge_auto.json", "merge_auto.png", "model"]  # grid deleted
    printed = capsys.readouterr().out
    assert "| alpha | density | lang_nll | recovery | VQA | admitted |" in printed
    assert f"chosen: α {rec['chosen']['alpha']:g}, density 1" in printed


def test_with_vqa_unharmed_the_most_recovering_alpha_is_chosen(ckpts, tmp_path):
    out = tmp_path / "out"
    assert auto(ckpts, out, "0") == 0
    rec = json.loads((out / "merge_auto.json").read_text())
    rs = [p["recovery"] for p in rec["points"]]
    assert 0 < rs[0] < rs[1] < rs[2]      # toward the base LLM (its added-token rows stay the VLM's: not 100%)
    assert rec["chosen"] == {"alpha": 1.0, "density": 1.0} == {"alpha": implied(rec), "density": 1.0}


def test_no_point_within_the_budget_means_no_merge(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert auto(ckpts, out, "0.5", "--vqa-budget", "0") == 0
    rec = json.loads((out / "merge_auto.json").read_text())
    assert rec["chosen"] is None and not (out / "model").exists() and (out / "merge_auto.png").exists()
    assert "no merge (α = 0): no point keeps VQA within the budget" in capsys.readouterr().out


def test_a_density_grid_is_searched_too(ckpts, tmp_path):
    out = tmp_path / "out"
    assert auto(ckpts, out, "0", "--density", "1,0.5", "--sparsify", "magnitude") == 0
    rec = json.loads((out / "merge_auto.json").read_text())
    assert [(p["alpha"], p["density"]) for p in rec["points"]] == [(a, d) for d in (1.0, 0.5) for a in (0.25, 0.5, 1.0)]
    assert rec["chosen"] == {"alpha": implied(rec), "density": max(rec["points"], key=lambda p: p["recovery"])["density"]}


@pytest.mark.parametrize("extra,message", [
    (["--vqa-eval", "python eval.py"], "--vqa-eval must contain {model}"),
    ([], "--alpha auto needs --vqa-eval CMD"),
    (["--vqa-eval", "python -c 'print(1)' {model}", "--vqa-budget", "-1"], "--vqa-budget -1.0 is negative"),
])
def test_bad_input_fails_before_anything_is_merged(ckpts, tmp_path, capsys, extra, message):
    base, vlm, _ = ckpts
    out = tmp_path / "out"
    assert main(["merge", "--vlm", str(vlm), "--base-llm", str(base), "--out", str(out), "--alpha", "auto",
                 *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_an_evaluation_that_prints_no_number_is_named(ckpts, tmp_path, capsys):
    base, vlm, _ = ckpts
    out = tmp_path / "out"
    assert main(["merge", "--vlm", str(vlm), "--base-llm", str(base), "--out", str(out), "--alpha", "auto",
                 "--vqa-eval", f"{sys.executable} -c \"print('accuracy:high')\" {{model}}"]) == 2
    assert "its last output line should be the score (a number), got 'accuracy:high'" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_rule_ties_and_pareto_front():
    pts = [{"alpha": a, "density": 1.0, "recovery": r, "vqa": v} for a, r, v in
           [(0.2, 0.5, 0.80), (0.4, 0.5, 0.80), (0.6, 0.9, 0.70), (0.8, 0.4, 0.79)]]
    assert choose(pts, 0.80, 0.01)["alpha"] == 0.2                  # tie on recovery: the smaller alpha
    assert [p["admitted"] for p in pts] == [True, True, False, True]
    assert [p["alpha"] for p in pareto(pts)] == [0.2, 0.4, 0.6]     # 0.8 is beaten by 0.2 on both
    assert choose(pts, 0.80, 0.2)["alpha"] == 0.6
