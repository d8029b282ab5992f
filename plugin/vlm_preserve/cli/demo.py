"""`vlm-preserve demo`: the study in miniature on real pretrained parts — base LLM, Full-Tuning and RDD on
SmolLM2-135M-Instruct + EfficientNet-Lite0 (easy-vqa), language ability on bigbench — printing language retention
(with its 95% CI) beside easy-vqa accuracy. Settings are fixed here (not tuned on the reported tasks)."""
from __future__ import annotations

import time

# Sized for ~15 minutes on an idle 2-core CPU, installs included (README: the measured run). The learning rate
# (1e-4, the first probe's upper setting) is what so short a run needs to move the LLM at all; the study itself
# uses 2e-5 for 1,000 steps. Language: 25 questions from each of the 8 report tasks.
DEMO = dict(methods=("full", "rdd_rbf"), seeds=(0,), train_images=400, test_images=80, vqa_test_questions=120,
            stage1_steps=20, steps=50, lr=1e-4, batch=8, report_cap=25, ppl_texts=30, save_steps=10 ** 6)


def demo(out: str, data_dir: str = "", tiny: bool = False, **overrides) -> int:
    from ..study.report import load_runs, markdown, rows
    from ..study.run import Study, StudyConfig
    t0 = time.time()
    cfg = StudyConfig(out=out, data_dir=data_dir, tiny=tiny, **{**DEMO, **overrides})
    print(f"[demo] SmolLM2-135M-Instruct + EfficientNet-Lite0 on easy-vqa; {cfg.steps} tuning steps per method, "
          f"device {'cuda' if Study(cfg).device == 'cuda' else 'cpu'}; results in {out}/runs (rerun resumes)", flush=True)
    Study(cfg).run()
    table = rows(load_runs(Study(cfg).runs_dir))
    print("\n[demo] language: bigbench report tasks, log-likelihood multiple choice "
          f"({table[0]['n_lang']} questions); retention = accuracy / base accuracy, paired bootstrap 95% CI")
    print(markdown(table))
    print(f"[demo] done in {time.time() - t0:.0f} s")
    return 0
