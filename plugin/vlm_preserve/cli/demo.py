"""`vlm-preserve demo`: the study in miniature on real pretrained parts — the base LLM, Full-Tuning, the plugin's
best regularizer, upstream's LoRA and the training-free merge on SmolLM2-135M-Instruct + EfficientNet-Lite0
(easy-vqa) — printing how much language Full-Tuning loses (chat-response and plain-text NLL against the base LLM,
paired 95% CIs) and how much of it each method recovers, beside easy-vqa accuracy. The regime (learning rate,
steps) is the study's own, chosen on validation items (docs/study.md); the demo scores a prefix of the study's
report items."""
from __future__ import annotations

import time

# Sized for ≤ 15 minutes on an idle 2-core CPU doing ~170 GFLOP/s, installs included (README: the measured run).
# The regime (lr, 30 steps of a 100-step cosine schedule, images, stage 1) is StudyConfig's default, the study's
# mild regime: on validation items Full-Tuning lost +0.150 nats of chat-reply NLL, CI [+0.115, +0.185], there
# (docs/results-pilot.md).
# Methods: upstream's LoRA, the merge and LinguDistill (distill), rows the rebuilt table says keep language
# (docs/results-strong.md), at the settings chosen there on validation: LoRA rank 4, distill's default weight 1,
# the merge's α 0.5. (Mixing in text, also kept there, is what distill's data already does.)
# Item counts: the study's report items cut to a prefix so the five evaluations fit the time.
DEMO = dict(methods=("full", "merge", "lora", "distill"), lora_rank=4, seeds=(0,), test_images=80,
            vqa_test_questions=80, language_report=100, merge_alphas=(0.5,), save_steps=10 ** 6, mechanism=False)
# --smoke: the same phases on a handful of items, so the test command walks every real source and cache
SMOKE = dict(DEMO, train_images=8, test_images=4, vqa_test_questions=6, stage1_steps=2, steps=2, schedule_steps=0, batch=2,
             language_validation=4, language_report=6, vqa_validation_questions=4, instruction_samples=8)

# Seconds each phase took in the demo's measured run (README), and that machine's fp32 GEMM rate: the time-left
# estimate starts from these scaled by this machine's measured rate, then follows this run's own pace.
# The README's run, 2026-12-08 (10 min 17 s on a fresh clone, installs included): phases as its progress lines timed
# them, at the rate it printed at its start.
REFERENCE_GFLOPS = 203.0
REFERENCE_S = {"eval:base": 72.0, "stage1": 42.0, "train": 3.2, "eval": 48.0}


class Progress:
    """Prints, as each phase starts, the phases done and an estimate of the time left."""

    def __init__(self, phases: list[str], steps: int, gflops: float):
        self.phases, self.steps, self.t0, self.done = phases, steps, time.time(), 0
        self.scale = REFERENCE_GFLOPS / max(gflops, 1e-3)

    def cost(self, phase: str) -> float:
        kind = phase.split(":")[0]
        if phase in REFERENCE_S:
            return REFERENCE_S[phase]
        return REFERENCE_S["train"] * self.steps if kind == "train" else REFERENCE_S[kind]

    def __call__(self, phase: str) -> None:
        if phase in self.phases:
            self.done = self.phases.index(phase)
        spent = time.time() - self.t0
        ref_done = sum(self.cost(p) for p in self.phases[:self.done])
        pace = spent / ref_done if ref_done > 30 else self.scale   # this run's own pace once it has one
        left = pace * sum(self.cost(p) for p in self.phases[self.done:])
        print(f"[demo] {phase} ({self.done + 1}/{len(self.phases)}); {spent / 60:.1f} min so far, about "
              f"{left / 60:.0f} min left", flush=True)


def demo(out: str, data_dir: str = "", tiny: bool = False, smoke: bool = False, **overrides) -> int:
    from ..study.report import load_runs, rows
    from ..study.machine import cpu_gflops
    from ..study.run import Study, StudyConfig
    t0 = time.time()
    cfg = StudyConfig(out=out, data_dir=data_dir, tiny=tiny, **{**(SMOKE if smoke else DEMO), **overrides})
    study = Study(cfg)
    gflops = cpu_gflops()
    tuned = [m for m in cfg.methods if m not in ("base", "merge")]
    phases = ["eval:base", "stage1"]
    for m in tuned:
        phases += [f"train:{m}_s0", f"eval:{m}_s0"]
        if m == "full" and "merge" in cfg.methods:
            phases += [f"eval:merge_a{a}_s0" for a in cfg.merge_alphas]
    study.progress = Progress(phases, cfg.steps, gflops)
    print(f"[demo] SmolLM2-135M-Instruct + EfficientNet-Lite0 on easy-vqa: Full-Tuning, "
          f"{', '.join(m for m in tuned if m != 'full')} and the merge, {cfg.steps} tuning steps at lr {cfg.lr:g} "
          f"of a {cfg.schedule_steps or cfg.steps}-step cosine schedule (the study's mild regime); device {study.device}, this CPU {gflops:.0f} GFLOP/s fp32 "
          f"(the README's run: {REFERENCE_GFLOPS:.0f}); results in {study.runs_dir} (rerun resumes)", flush=True)
    study.run()
    print(summary(rows(load_runs(study.runs_dir))))
    print(f"[demo] done in {time.time() - t0:.0f} s" + (" (smoke: every source and cache of the real path worked; "
                                                         "its numbers mean nothing)" if smoke else ""))
    return 0


def summary(table: list[dict]) -> str:
    """What the demo prints: Full-Tuning's degradation, each method's recovery, easy-vqa."""
    from ..study.report import ci
    n = next((r for r in table if "chat_n" in r), {})
    lines = [f"\n[demo] language against the base LLM on held-out report items ({n.get('chat_n', 0)} chat replies, "
             f"{n.get('text_n', 0)} prose documents); paired bootstrap 95% CIs. Δ NLL > 0: worse than the base LLM. "
             "recovery = (method − full) / (base − full): 100% = no loss, 0% = Full-Tuning's loss.",
             "| method | Δ chat NLL | chat recovery | Δ text NLL | text recovery | p(end after 1st token) | easy-vqa |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {ci(r.get('d_chat'))} | {ci(r.get('rec_chat'), True)} | "
                     f"{ci(r.get('d_text'))} | {ci(r.get('rec_text'), True)} | {r.get('p_end1', float('nan')):.3g} | "
                     f"{r['vqa']} |")
    return "\n".join(lines)
