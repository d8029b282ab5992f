"""The study: every method of the RRVLM table on the same VLM, data and evaluation, through `attach(trainer, ...)`.

Stages per seed: (1) projector pretraining (LLM frozen), shared by every method of that seed; (2) instruction
tuning with the method. Each finished run is one json in `<out>/runs/`; a rerun skips it. An interrupted run
resumes from its last Trainer checkpoint (`<out>/ckpt/<run>/`), deleted once the run's json is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as D
from .evaluate import chat_pairs, mc_eval, mean, reply_nll, text_pairs, vqa_eval
from .format import Collator, sample
from .machine import cpu_gflops, idle_cores

# method -> how its stage 2 differs from Full-Tuning. `regularizer` goes to attach(); `set`: the method's fixed
# settings (fields of a regularizer's config or of StudyConfig, as a setting of the selection sweep is); `data`:
# "vqa" or "mix" (text-only instructions replace `mix_fraction` of the samples: same total volume); merge rows are
# computed from the full run.
METHODS = {
    "full": {},
    "attention_tuning": {"regularizer": "attention_tuning"},
    "lora": {"lora": True},
    "soft_label": {"regularizer": "soft_label"},
    "dft": {"regularizer": "dft"},
    "mix": {"data": "mix"},
    "rdd_rbf": {"regularizer": "rdd", "set": {"rdd_kernel": "rbf"}},
    "rdd_linear": {"regularizer": "rdd", "set": {"rdd_kernel": "linear"}},
    "rdd_l2": {"regularizer": "rdd", "set": {"rdd_kernel": "l2"}},
    "pre": {"regularizer": "pre"},
    "distill": {"regularizer": "distill", "data": "mix"},
    "rdd_pre": {"regularizer": "rdd,pre", "set": {"rdd_kernel": "rbf"}},
}


@dataclass
class StudyConfig:
    out: str
    runs_dir: str = ""                  # where each finished run's json goes; default <out>/runs (the table's:
                                        # docs/results/runs, committed, so a fresh clone resumes)
    data_dir: str = ""                  # caches (features, SmolLM2 folder, language sets); default <out>/data
    bigbench_tarball: str = ""          # optional: bigbench-1.0.0.tar.gz, for the multiple-choice columns
    select_dir: str = ""                # the selection sweep's jsons (study/select.py; --select writes them there,
                                        # default <out>/select/<regime>): the table runs each method at the setting
                                        # its rule chose; empty: every method at its default
    tiny: bool = False                  # tiny random Llama + byte tokenizer (tests, smoke runs)
    methods: tuple = ("full", "attention_tuning", "lora", "soft_label", "mix", "merge", "rdd_rbf", "rdd_linear",
                      "rdd_l2", "pre", "distill", "rdd_pre")
    seeds: tuple = (0, 1, 2)
    # The regime: the mild one (study/sweep.py's REGIMES, chosen by its rule on validation items before any report
    # number; `--regime strong` gives the other). `steps` are trained of a cosine schedule `schedule_steps` long
    # (0: as long as `steps`): the pilot measured the mild regime as a checkpoint of a 100-step run.
    train_images: int = 400             # 0 = all 4,000
    test_images: int = 200
    vqa_test_questions: int = 300
    stage1_steps: int = 20
    stage1_lr: float = 1e-3
    steps: int = 30
    schedule_steps: int = 100
    lr: float = 1e-4
    batch: int = 8
    mix_fraction: float = 0.2
    merge_alphas: tuple = (0.25, 0.5, 0.75)
    # merge --alpha auto stacked on each of these methods' runs: row merge_<method> (merge_full is WiSE-FT, the
    # interpolation with the base LLM), α chosen on validation items from merge_grid by offline/merge_auto.py's rule
    # with a VQA budget of merge_vqa_budget; needs the methods' models kept (keep_models) or in this same run
    merge_sources: tuple = ()
    merge_grid: tuple = (0.25, 0.5, 0.75, 1.0)
    merge_vqa_budget: float = 0.01
    lora_rank: int = 16
    report_cap: int = 25                # with --bigbench-tarball: questions per report task (fixed subset)
    validation_cap: int = 0             # with --bigbench-tarball: questions per validation task (0: none)
    # the loss-based language metrics (study/data.py): validation items choose settings, report items are the
    # table's; text documents are scored on their first `text_tokens` tokens
    language_validation: int = 300
    language_report: int = 600
    text_tokens: int = 96
    vqa_validation_questions: int = 150   # from held-out training images (never trained on, never the test split)
    instruction_samples: int = 4000
    save_steps: int = 250
    bf16: bool = True                   # bf16 autocast where a GPU runs it (CPU: always fp32)
    keep_models: bool = False           # keep every tuned run's weights in <out>/models (merges stacked on a method
                                        # later need them; Full-Tuning's is kept anyway where merge is a method)
    mechanism: bool = True              # each tuned run also measures RDD's and PRe's quantities and diagnose's
                                        # metrics against its pre-tuning anchor (study/mechanism.py)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS and m not in ("merge", "base")]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from base, merge, {', '.join(METHODS)}")
        if "merge" in self.methods and "full" not in self.methods:
            raise ValueError("merge is computed from the full run: add full to the methods")
        bad = [m for m in self.merge_sources if m not in METHODS]
        if bad:
            raise ValueError(f"--merge-sources {bad}: not methods; choose from {', '.join(METHODS)}")
        if not 0 <= self.mix_fraction < 1 or self.steps <= 0 or self.batch <= 0:
            raise ValueError("need 0 <= mix_fraction < 1, steps > 0, batch > 0")
        if self.schedule_steps and self.schedule_steps < self.steps:
            raise ValueError(f"--schedule-steps {self.schedule_steps} is shorter than --steps {self.steps}: the "
                             "cosine schedule must cover the steps trained (0: as long as --steps)")
        if self.bigbench_tarball and not Path(self.bigbench_tarball).is_file():
            raise ValueError(f"--bigbench-tarball {self.bigbench_tarball}: no such file")


def check_packages(cfg: StudyConfig) -> None:
    """Say what to install before anything loads (the wheel does not pull the study's data and model packages):
    every pinned source (study/sources.py) present, at its version and content, and the modules the study runs."""
    import importlib.util

    from .sources import SourceError, path
    try:
        for name in ("vqa", "vision", "chat", "text_news", "text_wiki", "instructions") + (() if cfg.tiny else ("llm",)):
            path(name)
    except SourceError as e:
        raise SystemExit(f"vlm-preserve study/demo: {e}") from None
    need = {"efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0", "tqdm": "tqdm", "yaml": "pyyaml"}
    if not cfg.tiny:
        need["gguf"] = "gguf==0.19.0"
    if "lora" in cfg.methods:
        need["peft"] = "peft==0.21.2"
    missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise SystemExit("vlm-preserve study/demo needs: " + ", ".join(missing) + ". Install them with "
                         "`bash scripts/setup_env.sh study` (third_party/study/requirements.txt), or pip install each.")


class Study:
    def __init__(self, cfg: StudyConfig):
        cfg.validate()
        check_packages(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.data_dir = Path(cfg.data_dir or self.out / "data")
        self.runs_dir = Path(cfg.runs_dir or self.out / "runs")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        for d in ("ckpt", "stage1", "models"):
            (self.out / d).mkdir(parents=True, exist_ok=True)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            # On a CPU other processes already keep busy, torch's spinning OpenMP threads lose far more than they
            # gain (measured here: a 60-token SmolLM2 forward took 3-7 s with 2 threads at load 6, 0.3-0.5 s with
            # 1): use only the cores that are idle now (at least one). OMP_NUM_THREADS overrides.
            torch.set_num_threads(max(1, min(os.cpu_count() or 1, idle_cores())))
        self._data = None
        self.progress = lambda phase: None   # told each phase as it starts ("base", "stage1", "train:<run>",
                                             # "eval:<run>"); the demo prints the time left from it

    # ---- parts -------------------------------------------------------------------------------------------
    def tokenizer(self):
        from .model import ByteTokenizer, smollm2_dir
        if self.cfg.tiny:
            return ByteTokenizer()
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(smollm2_dir(self.data_dir))

    def load_llm(self):
        from transformers import LlamaForCausalLM

        from .model import smollm2_dir, tiny_llm_config
        if self.cfg.tiny:
            path = self.data_dir / "tiny-llama"
            if not (path / "config.json").exists():
                torch.manual_seed(0)
                LlamaForCausalLM(tiny_llm_config()).save_pretrained(path)
        else:
            path = smollm2_dir(self.data_dir)
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)

    def image_token_id(self, llm) -> int:
        return llm.config.vocab_size  # outside the vocabulary: never a real token, replaced before the decoder

    def data(self) -> dict:
        """Tokenized training pools and the evaluation sets (built once per process)."""
        if self._data is not None:
            return self._data
        c, tok = self.cfg, self.tokenizer()
        train, train_f = D.cached_features(self.data_dir, "train", c.train_images)
        test, test_f = D.cached_features(self.data_dir, "test", c.test_images)
        test = D.subsample(test, c.vqa_test_questions)
        report, val = [], []
        if c.bigbench_tarball:
            tasks = D.load_tasks(self.data_dir, D.REPORT_TASKS + D.VALIDATION_TASKS, c.bigbench_tarball)
            report = [q for t in D.REPORT_TASKS for q in D.subsample(tasks[t], c.report_cap)]
            val = [q for t in D.VALIDATION_TASKS for q in D.subsample(tasks[t], c.validation_cap)] if c.validation_cap \
                else []
        lang = D.language_sets(self.data_dir, c.language_validation, c.language_report)
        instr = D.subsample(lang.pop("instructions"), c.instruction_samples, seed=1)
        val_vqa, val_f = D.cached_features(self.data_dir, "heldout", c.train_images)
        self._data = {"tok": tok, "train": train, "train_f": train_f, "test": test, "test_f": test_f,
                      "report": report, "validation": val, "instruction": instr,
                      "answers": D.easy_vqa_answers(), "lang": lang,
                      "val_vqa": D.subsample(val_vqa, c.vqa_validation_questions), "val_vqa_f": val_f}
        return self._data

    def train_rows(self, kind: str, seed: int, image_token_id: int, total: int, mix_fraction=None) -> list[dict]:
        """`total` samples (= steps × batch): easy-vqa questions, or with `mix` a share of text-only instructions
        (chatterbot-corpus question–answer pairs)."""
        from .model import IMAGE_TOKENS
        d, rng = self.data(), random.Random(seed)
        fraction = self.cfg.mix_fraction if mix_fraction is None else mix_fraction
        n_text = round(total * fraction) if kind == "mix" else 0
        vqa = [d["train"][rng.randrange(len(d["train"]))] for _ in range(total - n_text)]
        rows = [sample(d["tok"], it.question, it.answer, it.image, image_token_id, IMAGE_TOKENS) for it in vqa]
        for _ in range(n_text):
            q = d["instruction"][rng.randrange(len(d["instruction"]))]
            rows.append(sample(d["tok"], q["question"], q["answer"]))
        rng.shuffle(rows)
        return rows

    # ---- training ----------------------------------------------------------------------------------------
    def trainer(self, model, rows, run_dir: Path, steps: int, lr: float, seed: int, schedule: int = 0):
        """A Trainer over `steps` steps of a cosine schedule `schedule` steps long (0: `steps`)."""
        from transformers import Trainer, TrainerCallback, TrainingArguments
        schedule = schedule or steps
        args = TrainingArguments(
            output_dir=str(run_dir), max_steps=schedule, per_device_train_batch_size=self.cfg.batch,
            learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, schedule // 30), weight_decay=0.0,
            logging_steps=max(1, min(10, steps // 5)), save_steps=self.cfg.save_steps, save_total_limit=1,
            report_to=[], remove_unused_columns=False, seed=seed, data_seed=seed, dataloader_num_workers=0,
            # bf16 autocast only on a GPU: on this project's CPUs (no native bf16) a SmolLM2 step took 140-220 s
            # under bf16 autocast against 8-10 s in fp32
            bf16=self.cfg.bf16 and self.device == "cuda", use_cpu=self.device == "cpu", disable_tqdm=False)
        tr = Trainer(model=model, args=args, train_dataset=rows,
                     data_collator=Collator(self.data()["train_f"], self.data()["tok"].pad_token_id))
        if steps < schedule:
            class Stop(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    control.should_training_stop = control.should_training_stop or state.global_step >= steps
            tr.add_callback(Stop())
        return tr

    def stage1(self, seed: int) -> Path:
        """Projector pretraining (LLM frozen), once per seed."""
        from .model import build_vlm
        path = self.out / "stage1" / f"projector_s{seed}.pt"
        if path.exists():
            return path
        llm = self.load_llm()
        vlm = build_vlm(llm, self.image_token_id(llm), seed=seed)
        vlm.llm.requires_grad_(False)
        c = self.cfg
        rows = self.train_rows("vqa", seed + 1000, vlm.config.image_token_id, c.stage1_steps * c.batch)
        self.progress("stage1")
        print(f"[study] stage 1 (projector pretraining), seed {seed}: {c.stage1_steps} steps", flush=True)
        tr = self.trainer(vlm, rows, self.out / "ckpt" / f"stage1_s{seed}", c.stage1_steps, c.stage1_lr, seed)
        tr.train(resume_from_checkpoint=_last_checkpoint(tr.args.output_dir))
        torch.save(vlm.projector.state_dict(), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        shutil.rmtree(tr.args.output_dir, ignore_errors=True)
        return path

    def stage2(self, method: str, seed: int, steps: int = 0, lr: float = 0.0, callbacks=(), run: str = "",
               schedule: int = 0, setting: dict | None = None):
        """Instruction tuning with `method` (steps/lr/schedule: the config's unless given; `setting`: fields of a
        regularizer config or of StudyConfig over the method's own; `callbacks` see the Trainer); returns (the
        trained VLM, Trainer log history, wall seconds)."""
        from .. import attach
        from .model import adapter, build_vlm
        spec = METHODS[method]
        setting = {**spec.get("set", {}), **(setting or {})}
        configs, study_fields = split_setting(setting)
        c = dataclasses.replace(self.cfg, **study_fields)
        llm = self.load_llm()
        vlm = build_vlm(llm, self.image_token_id(llm), seed=seed)
        vlm.projector.load_state_dict(torch.load(self.stage1(seed)))
        prefix = "llm"
        if spec.get("lora"):
            from peft import LoraConfig, get_peft_model
            vlm.llm = get_peft_model(vlm.llm, LoraConfig(r=c.lora_rank, lora_alpha=2 * c.lora_rank, lora_dropout=0.0,
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"]))
            prefix = "llm.base_model.model"
        if steps:
            schedule = schedule or steps
        steps, lr = steps or c.steps, lr or c.lr
        schedule = schedule or c.schedule_steps or steps
        # rows for the whole schedule, so a run stopped early saw the same batches as the longer run it stands for
        rows = self.train_rows(spec.get("data", "vqa"), seed, vlm.config.image_token_id, schedule * c.batch,
                               c.mix_fraction)
        run_dir = self.out / "ckpt" / (run or f"{method}_s{seed}")
        tr = self.trainer(vlm, rows, run_dir, steps, lr, seed, schedule)
        for cb in callbacks:
            tr.add_callback(cb)
        handle = None
        if spec.get("regularizer"):
            teacher = self.load_llm() if spec["regularizer"] == "distill" else None
            handle = attach(tr, spec["regularizer"], *configs, adapter=adapter(vlm, prefix), teacher=teacher)
        self.progress(f"train:{run_dir.name}")
        print(f"[study] stage 2: {method}, seed {seed}: {steps} steps at lr {lr:g}", flush=True)
        t0 = time.time()
        tr.train(resume_from_checkpoint=_last_checkpoint(run_dir))
        wall = time.time() - t0
        history = tr.state.log_history
        if handle is not None:
            handle.detach()
        if spec.get("lora"):
            vlm.llm = vlm.llm.merge_and_unload()
        return vlm, history, wall

    # ---- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, llm, vlm=None, label: str = "") -> dict:
        from tqdm.auto import tqdm
        d = self.data()
        llm.to(self.device).eval()
        res = {}
        if d["report"]:
            with tqdm(total=len(d["report"]), desc=f"multiple choice ({label})", unit="q") as bar:
                res["language"] = mc_eval(llm, d["tok"], d["report"], progress=bar)
        if d["validation"]:
            res["validation"] = mc_eval(llm, d["tok"], d["validation"])
        res.update(self.language_nll(llm, "report"))
        if vlm is not None:
            vlm.to(self.device).eval()
            with tqdm(total=len(d["test"]), desc=f"easy-vqa ({label})", unit="q") as bar:
                res["vqa"] = vqa_eval(vlm, d["tok"], d["test"], d["test_f"], d["answers"], progress=bar)
        return res

    def mechanism(self, vlm, seed: int, res: dict) -> dict | None:
        """With `mechanism` on: the per-item quantities into `res["mechanism"]`; returns diagnose's metrics."""
        if not self.cfg.mechanism:
            return None
        from .mechanism import measure
        from .model import build_vlm
        llm = self.load_llm()
        anchor = build_vlm(llm, self.image_token_id(llm), seed=seed)
        anchor.projector.load_state_dict(torch.load(self.stage1(seed)))
        d = self.data()
        res["mechanism"], diagnose = measure(vlm.to(self.device), anchor.to(self.device), d["tok"], d["test"],
                                             d["test_f"])
        return diagnose

    def language_nll(self, llm, split: str) -> dict:
        """{chat: per-item reply NLL and p_end1, text: per-document NLL} on the `split` items."""
        d, tok = self.data(), self.data()["tok"]
        llm.to(self.device).eval()
        end = tok.encode("<|im_end|>", add_special_tokens=False)[0]
        return {"chat": reply_nll(llm, chat_pairs(tok, d["lang"]["chat"][split]), end),
                "text": reply_nll(llm, text_pairs(tok, d["lang"]["text"][split], self.cfg.text_tokens))}

    def validation_eval(self, vlm) -> dict:
        """What choosing a setting may look at: the language metrics' validation items and easy-vqa questions on
        held-out training images."""
        d = self.data()
        res = self.language_nll(vlm.llm, "validation")
        vlm.to(self.device).eval()
        res["vqa"] = vqa_eval(vlm, d["tok"], d["val_vqa"], d["val_vqa_f"], d["answers"])
        return res

    # ---- the table ---------------------------------------------------------------------------------------
    def path(self, run: str) -> Path:
        return self.runs_dir / f"{run}.json"

    def write(self, run: str, method: str, seed, result: dict, wall: float, history=None, diagnose=None,
              **extra) -> dict:
        rec = {"run": run, "method": method, "seed": seed, "setting": self.settings().get(method, {}),
               "wall_s": round(wall, 1),
               "config": dataclasses.asdict(self.cfg), "sources": _sources(self.cfg),
               "device": torch.cuda.get_device_name() if self.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
               "cpu_gflops": cpu_gflops(), "torch_threads": torch.get_num_threads(),
               "summary": summarize(result), "items": result,
               "train_log": [r for r in (history or []) if "loss" in r][-20:]}
        if diagnose is not None:
            rec["diagnose"] = diagnose
        rec.update(extra)
        tmp = self.path(run).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self.path(run))
        return rec

    def run(self) -> list[str]:
        """Every (method, seed) not yet in <out>/runs; returns the runs done now."""
        done = []
        if not self.path("base").exists():
            self.progress("eval:base")
            t0 = time.time()
            self.write("base", "base", None, self.evaluate(self.load_llm(), label="base LLM"), time.time() - t0)
            done.append("base")
        for seed in self.cfg.seeds:
            for method in self.cfg.methods:
                if method in ("base", "merge"):
                    continue
                run = f"{method}_s{seed}"
                if self.path(run).exists() and not (method == "full" and self._merge_missing(seed)):
                    continue
                if self.path(run).exists():  # full done, merges missing: reload the saved full model
                    vlm = self._kept_or_retrained(method, seed)
                else:
                    vlm, history, wall = self.stage2(method, seed, setting=self.settings().get(method))
                    self.progress(f"eval:{run}")
                    t0 = time.time()
                    res = self.evaluate(vlm.llm, vlm, label=run)
                    diagnose = self.mechanism(vlm, seed, res)
                    merged_later = method in self.cfg.merge_sources or (method == "full" and "merge" in self.cfg.methods)
                    if self.cfg.keep_models or merged_later:
                        self._save_full(vlm, run)
                    self.write(run, method, seed, res, wall + time.time() - t0, history, diagnose)
                    shutil.rmtree(self.out / "ckpt" / run, ignore_errors=True)
                    done.append(run)
                if method == "full" and "merge" in self.cfg.methods:
                    done += self.merges(vlm, seed)
            for source in self.cfg.merge_sources:
                done += self.auto_merge(source, seed)
        return done

    def settings(self) -> dict:
        """{method: setting} chosen by the selection sweep in `select_dir` ({} without one). RDD+PRe is not swept
        (its grid would be the product of both): it runs each term at the setting chosen for it alone."""
        if not self.cfg.select_dir:
            return {}
        from .select import chosen_settings
        chosen = chosen_settings(Path(self.cfg.select_dir))
        if "rdd_rbf" in chosen or "pre" in chosen:
            chosen["rdd_pre"] = {**chosen.get("rdd_rbf", {}), **chosen.get("pre", {})}
        return chosen

    def _merge_missing(self, seed: int) -> bool:
        return "merge" in self.cfg.methods and any(not self.path(f"merge_a{a}_s{seed}").exists()
                                                   for a in self.cfg.merge_alphas)

    def _save_full(self, vlm, run: str) -> None:
        from safetensors.torch import save_model  # keeps the tied embedding/LM head tied
        path = self.out / "models" / f"{run}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(vlm, str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)

    def _check_same_history(self, run: str, history: list) -> None:
        """A retrained run must reproduce the committed one, or its merges would describe another model. Another
        CPU's kernels round differently, so the losses are compared to 1% rather than bit for bit."""
        want = [r["loss"] for r in json.loads(self.path(run).read_text()).get("train_log", [])]
        got = [r["loss"] for r in history if "loss" in r][-len(want):] if want else []
        diff = max((abs(a - b) / max(abs(a), 1e-9) for a, b in zip(want, got)), default=float("inf"))
        print(f"[study] {run} retrained: training losses within {diff:.2%} of the committed run", flush=True)
        if len(got) != len(want) or diff > 0.01:
            raise RuntimeError(f"retraining {run} did not reproduce its committed training losses "
                               f"(largest relative difference {diff:.2%}): delete {self.path(run)} to redo the run "
                               "with its merges")

    def _kept_or_retrained(self, method: str, seed: int):
        """The model of a run whose json is committed: its kept file, or (not kept: another machine, or run without
        --keep-models) retrained at the same setting, checked against the json's losses, and kept from then on."""
        run = f"{method}_s{seed}"
        vlm = self._load_model(run, seed)
        if vlm is None:
            print(f"[study] {run}: its model was not kept; retraining it (its json stays)", flush=True)
            vlm, history, _ = self.stage2(method, seed, setting=self.settings().get(method))
            # before the check: a refused retrain must not leave a checkpoint that a fresh run would resume from
            shutil.rmtree(self.out / "ckpt" / run, ignore_errors=True)
            self._check_same_history(run, history)
            self._save_full(vlm, run)
        return vlm

    def _load_model(self, run: str, seed: int):
        """The saved VLM of `run`, or None where its model file is absent."""
        from safetensors.torch import load_model

        from .model import build_vlm
        if not (self.out / "models" / f"{run}.safetensors").exists():
            return None
        llm = self.load_llm()
        vlm = build_vlm(llm, self.image_token_id(llm), seed=seed)
        load_model(vlm, str(self.out / "models" / f"{run}.safetensors"))
        return vlm

    def auto_merge(self, source: str, seed: int) -> list[str]:
        """Row merge_<source>: `vlm-preserve merge --alpha auto`'s rule (offline/merge_auto.py's `choose`) on the
        source run's model, on validation items: VQA = validation easy-vqa accuracy, within merge_vqa_budget of the
        source's own; language recovery = the mean, over chat replies and prose, of (nll(source) − nll(merged)) /
        (nll(source) − nll(base LLM)), a metric where the source is no worse than the base LLM left out (nothing
        to recover there). The chosen α is then scored on the report items; the curve is stored in the json."""
        from ..offline.merge import sparsify
        from ..offline.merge_auto import choose, recovery
        run = f"merge_{source}_s{seed}"
        if self.path(run).exists():
            return []
        if not self.path(f"{source}_s{seed}").exists():
            raise RuntimeError(f"{run}: {source}_s{seed} has not been run (no {self.path(f'{source}_s{seed}')}); "
                               f"add {source} to --methods, or drop it from --merge-sources")
        vlm = self._kept_or_retrained(source, seed)
        self.progress(f"eval:{run}")
        t0 = time.time()
        llm = self.load_llm()
        base = llm.state_dict()
        base_nll = {p: mean(x["nll"] for x in v) for p, v in self.language_nll(llm, "validation").items()}
        tuned = {k: v.detach().clone() for k, v in vlm.llm.state_dict().items()}

        def at(a: float) -> dict:
            vlm.llm.load_state_dict({k: (v.float() + a * sparsify(base[k].float() - v.float(), "none", 1.0)).to(v.dtype)
                                     for k, v in tuned.items()})
            r = self.validation_eval(vlm)
            return {"alpha": a, "density": 1.0, "vqa": mean(x["acc"] for x in r["vqa"]),
                    **{f"{p}_nll": mean(x["nll"] for x in r[p]) for p in ("chat", "text")}}
        ref = at(0.0)
        lost = [p for p in ("chat", "text") if ref[f"{p}_nll"] > base_nll[p]]
        points = []
        for a in self.cfg.merge_grid:
            pt = at(a)
            pt["recovery"] = mean(recovery(ref[f"{p}_nll"], pt[f"{p}_nll"], base_nll[p]) for p in lost) if lost \
                else float("nan")
            points.append(pt)
            print(f"[study] {run}: α {a:g} on validation: recovery {pt['recovery']:+.1%}, easy-vqa {pt['vqa']:.3f} "
                  f"(source {ref['vqa']:.3f})", flush=True)
        chosen = choose(points, ref["vqa"], self.cfg.merge_vqa_budget)
        alpha = chosen["alpha"] if chosen else 0.0
        vlm.llm.load_state_dict({k: (v.float() + alpha * sparsify(base[k].float() - v.float(), "none", 1.0)).to(v.dtype)
                                 for k, v in tuned.items()})
        res = self.evaluate(vlm.llm, vlm, label=run)
        diagnose = self.mechanism(vlm, seed, res)
        self.write(run, f"merge_{source}", seed, res, time.time() - t0, diagnose=diagnose,
                   merge={"source": f"{source}_s{seed}", "alpha": alpha, "vqa_budget": self.cfg.merge_vqa_budget,
                          "reference": ref, "base_validation_nll": base_nll, "curve": points})
        return [run]

    def merges(self, vlm, seed: int) -> list[str]:
        """ModelMerge: θ = θ_vlm + α·(θ_llm − θ_vlm) on the language model (projector kept), sparsifier `none`,
        with offline/merge.py's own `sparsify` (the same arithmetic as `vlm-preserve merge`)."""
        from ..offline.merge import sparsify
        done = []
        base = self.load_llm().state_dict()
        tuned = {k: v.detach().clone() for k, v in vlm.llm.state_dict().items()}
        for a in self.cfg.merge_alphas:
            run = f"merge_a{a}_s{seed}"
            if self.path(run).exists():
                continue
            self.progress(f"eval:{run}")
            t0 = time.time()
            merged = {k: (v.float() + a * sparsify(base[k].float() - v.float(), "none", 1.0)).to(v.dtype)
                      for k, v in tuned.items()}
            vlm.llm.load_state_dict(merged)
            res = self.evaluate(vlm.llm, vlm, label=run)
            diagnose = self.mechanism(vlm, seed, res)
            self.write(run, f"merge_a{a}", seed, res, time.time() - t0, diagnose=diagnose)
            done.append(run)
        vlm.llm.load_state_dict(tuned)
        return done


def split_setting(setting: dict) -> tuple[list, dict]:
    """A setting's fields as (regularizer config objects, StudyConfig fields); an unknown field is an error."""
    from ..api import config_classes
    from ..config import PreserveArguments
    study = {f.name for f in dataclasses.fields(StudyConfig)}
    configs, left = [], dict(setting)
    for cls in config_classes():
        names = {f.name for f in dataclasses.fields(cls)}
        mine = {k: left.pop(k) for k in list(left) if k in names}
        if mine and cls is not PreserveArguments:
            configs.append(cls(**mine))
    bad = sorted(k for k in left if k not in study)
    if bad:
        raise ValueError(f"setting fields {bad} are neither a regularizer's option nor a study field")
    return configs, left


def summarize(res: dict) -> dict:
    s = summarize_nll(res)
    if res.get("language"):
        s.update(language_acc=mean(r["acc"] for r in res["language"]), language_n=len(res["language"]),
                 language_logp=mean(r["logp"] for r in res["language"]))
    if res.get("validation"):
        s["validation_acc"] = mean(r["acc"] for r in res["validation"])
    if res.get("mechanism"):
        for k in ("mmd2_before", "mmd2_after", "pre_cos"):
            s[k] = mean(r[k] for r in res["mechanism"])
    if "vqa" in res:
        s["vqa_acc"] = mean(r["acc"] for r in res["vqa"])
        s["vqa_yes_no_acc"] = mean(r["acc"] for r in res["vqa"] if r["yes_no"])
        s["vqa_other_acc"] = mean(r["acc"] for r in res["vqa"] if not r["yes_no"])
        s["vqa_n"] = len(res["vqa"])
    return s


def summarize_nll(res: dict) -> dict:
    s = {}
    if "chat" in res:
        s.update(chat_nll=mean(r["nll"] for r in res["chat"]), chat_p_end1=mean(r["p_end1"] for r in res["chat"]),
                 chat_n=len(res["chat"]))
    if "text" in res:
        s.update(text_nll=mean(r["nll"] for r in res["text"]), text_n=len(res["text"]))
    return s


def _sources(cfg: StudyConfig) -> dict:
    from .sources import SOURCES
    names = ["vqa", "vision", "chat", "text_news", "text_wiki", "instructions"] + ([] if cfg.tiny else ["llm"])
    return {n: f"{SOURCES[n].package}=={SOURCES[n].version}" for n in names}


def _last_checkpoint(run_dir) -> str | None:
    if not Path(run_dir).is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint
    return get_last_checkpoint(str(run_dir))
