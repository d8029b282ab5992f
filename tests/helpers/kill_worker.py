"""One training process of tests/test_kill.py: a tiny SmolVLM (its checkpoints reload exactly under transformers 5,
unlike the Llava-family native classes: test_ddp.py) on the Python API's Trainer with the regularizers attached,
6 steps, a checkpoint every 2 (at most --keep kept); --resume resumes with resume_from_checkpoint=True."""
import argparse

from helpers.native_models import build, teacher_of, trainer_for
from vlm_preserve import attach


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--regs", required=True)
    p.add_argument("--keep", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    model = build("smolvlm")
    trainer = trainer_for(model, "smolvlm", a.out, max_steps=6, save_strategy="steps", save_steps=2)
    trainer.args.save_total_limit = a.keep
    teacher = teacher_of(model, noise=0.05) if "distill" in a.regs else None
    attach(trainer, a.regs, teacher=teacher)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    print("TRAINED", flush=True)


if __name__ == "__main__":
    main()
