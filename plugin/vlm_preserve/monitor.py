"""Language monitor: watch language ability *during* training, not after it.

    llava-train ... --language_monitor builtin --language_monitor_steps 50
    add_language_monitor(trainer, "my_texts.jsonl", steps=50)          # any transformers.Trainer

Every N optimizer steps (and at step 0) the model is called text-only on a small held-out text set and the mean
token negative log-likelihood is logged as `lang_nll`, with `lang_nll_delta` = lang_nll − its step-0 value
(positive: the model got worse at language), through the Trainer's own `log` — so it reaches wandb/tensorboard
and `trainer_state.json` like `eval_loss` does (its own row, at the step it was measured).

Training is not changed: no gradient, every module's train/eval flag restored, and the python, numpy, torch CPU and
CUDA RNG states put back, so the losses are those of the run without the monitor, exactly. Under ZeRO-3/FSDP the
forwards are collective, so every rank evaluates (the same items, in the same order); only logging is the
Trainer's.

The text set: `builtin` (a short set shipped in the package, `data/language_monitor.jsonl`) or a jsonl file, one
item per line, either
    {"text": "..."}                                          scored: every token after the first
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
                                                             scored: the assistant turns only
Chats are rendered with the tokenizer's chat template; a tokenizer without one (upstream LLaVA's Vicuna/Llama
tokenizers) gets a plain fallback, "User: ...\\nAssistant: ...", after the tokenizer's BOS. Each item is cut to
`language_monitor_max_tokens` tokens. The metric is token-weighted: Σ NLL over every scored token of the set /
their number (long items weigh more, as in a corpus perplexity; exp(lang_nll) is that perplexity).

Offline, the same number for a checkpoint: `language_nll(model, tokenizer, "builtin")`, or
`vlm-preserve lang-nll CKPT [CKPT ...]`.

Resume: the step-0 reference cannot be recomputed from resumed weights; it is read back from the checkpoint's log
history (trainer_state.json), where this monitor logged it. If that history has none (the run that wrote the
checkpoint had no monitor), only `lang_nll` is logged, and a warning says so.
"""
from __future__ import annotations

import contextlib
import json
import random
import warnings
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from transformers import TrainerCallback

from .config import ConfigError

BUILTIN = "builtin"
FORMATS = ('{"text": "..."} or {"messages": [{"role": "user", "content": "..."}, '
           '{"role": "assistant", "content": "..."}]}')


@dataclass
class LanguageMonitorConfig:
    language_monitor: str = field(default="", metadata={
        "help": "Log lang_nll (mean token NLL on a held-out text set) and lang_nll_delta (change from step 0) during "
                "training: 'builtin' (a short set shipped with the plugin) or a jsonl path; empty = off."})
    language_monitor_steps: int = field(default=0, metadata={
        "help": "Evaluate the language monitor every this many optimizer steps (and at step 0); needs --language_monitor."})
    language_monitor_max_tokens: int = field(default=256, metadata={
        "help": "Cut each monitor text to at most this many tokens."})

    @property
    def enabled(self) -> bool:
        return bool(self.language_monitor)

    def validate(self, given: set[str] | None = None) -> list[dict]:
        """Check the flags and read the text set (no tokenizer, no model); returns the items ([] when off).
        `given`: the flags the user passed (the CLI knows it); without it, a non-default value counts as given."""
        if not self.enabled:
            for f in fields(self)[1:]:
                passed = f.name in given if given is not None else getattr(self, f.name) != f.default
                if passed:
                    raise ConfigError(f"--{f.name} was given but --language_monitor is not: add --language_monitor "
                                      "builtin (or a jsonl path) or drop the option.")
            return []
        if self.language_monitor_steps < 1:
            raise ConfigError(f"--language_monitor_steps {self.language_monitor_steps}: with --language_monitor, give "
                              "how often to evaluate it, a number of optimizer steps >= 1 (e.g. 50).")
        if self.language_monitor_max_tokens < 2:
            raise ConfigError(f"--language_monitor_max_tokens {self.language_monitor_max_tokens} leaves no token to "
                              "score; use 2 or more (default 256).")
        return load_texts(self.language_monitor)


def load_texts(spec: str) -> list[dict]:
    """The items of `spec` ('builtin' or a jsonl path), checked line by line."""
    if spec == BUILTIN:
        name, text = "the builtin set", resources.files("vlm_preserve").joinpath("data/language_monitor.jsonl").read_text(
            encoding="utf-8")
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--language_monitor {spec}: no such file. Give a jsonl file of held-out texts "
                              f"(one per line: {FORMATS}) or 'builtin'.")
        name, text = str(path), path.read_text(encoding="utf-8")
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--language_monitor {name}, line {n}: not valid JSON ({e.msg}). Each line must be "
                              f"one JSON object: {FORMATS}.") from None
        problem = _item_problem(item)
        if problem:
            raise ConfigError(f"--language_monitor {name}, line {n}: {problem}. Each line must be {FORMATS}.")
        items.append(item)
    if not items:
        raise ConfigError(f"--language_monitor {name} is empty: give at least one line, {FORMATS}.")
    return items


def _item_problem(item) -> str | None:
    if not isinstance(item, dict) or len({"text", "messages"} & set(item)) != 1:
        return "expected an object with either a 'text' or a 'messages' field"
    if "text" in item:
        return None if isinstance(item["text"], str) and item["text"].strip() else "'text' must be a non-empty string"
    msgs = item["messages"]
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"message {i} must be {{\"role\": str, \"content\": str}} (text content only)"
    if not any(m["role"] == "assistant" for m in msgs):
        return "'messages' has no assistant turn, so nothing would be scored"
    return None


# ---- tokenization: (token ids, which tokens are scored) -------------------------------------------------------

def text_tokenizer(tokenizer_or_processor):
    """A processor (transformers-native VLMs' processing_class) holds the tokenizer."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


def _chat_spans(tok, msgs) -> tuple[str, list]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    if getattr(tok, "chat_template", None):
        def render(ms, gen=False):
            return tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)
        full, spans = render(msgs), []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before, through = render(msgs[:i], gen=True) if i else "", render(msgs[:i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise ConfigError("the tokenizer's chat template does not render a conversation as the prefix of its "
                                  "continuation, so the assistant turns cannot be located; use {\"text\": ...} items.")
            spans.append((len(before), len(through)))
        return full, spans
    # no chat template: "Role: content" lines; the reply itself is scored
    full, spans = "", []
    for m in msgs:
        full += f"{m['role'].capitalize()}: "
        if m["role"] == "assistant":
            spans.append((len(full), len(full) + len(m["content"])))
        full += m["content"] + "\n"
    return full, spans


def encode(tokenizer, item: dict, max_tokens: int) -> tuple[list[int], list[bool]]:
    """Token ids of one item and, per token, whether its prediction is scored; cut to `max_tokens`.
    Chat segments are tokenized one by one (scored spans never share a token with their context)."""
    tok = text_tokenizer(tokenizer)
    if "text" in item:
        ids = tok(item["text"])["input_ids"]
        scored = [True] * len(ids)
    else:
        full, spans = _chat_spans(tok, item["messages"])
        templated = bool(getattr(tok, "chat_template", None))
        # a template writes its own BOS into the text; the fallback starts with the tokenizer's BOS, if any
        ids = [] if templated or tok.bos_token_id is None else [tok.bos_token_id]
        scored = [False] * len(ids)
        cuts, pos = [], 0
        for s, e in spans:
            cuts += [(full[pos:s], False), (full[s:e], True)]
            pos = e
        cuts.append((full[pos:], False))
        for piece, is_scored in cuts:
            if piece:
                piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                scored += [is_scored] * len(piece_ids)
    return ids[:max_tokens], scored[:max_tokens]


def encode_all(tokenizer, items: list[dict], max_tokens: int) -> list[tuple[list[int], list[bool]]]:
    encoded = [encode(tokenizer, it, max_tokens) for it in items]
    if not any(any(s[1:]) for _, s in encoded):
        raise ConfigError(f"the language monitor's texts leave no token to score within {max_tokens} tokens "
                          "(assistant turns cut off?); raise --language_monitor_max_tokens or shorten the prompts.")
    return encoded


# ---- the metric ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def untouched(model):
    """Run inside: no gradient, eval mode; afterwards every module's train flag and every RNG state are back."""
    import numpy as np
    import torch
    modes = [(m, m.training) for m in model.modules()]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if cuda else None)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training  # the flag itself: some modules' train() override keeps them frozen in eval
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda:
            torch.cuda.set_rng_state_all(rng[3])


def nll_sum(model, encoded, device) -> tuple[float, int]:
    """(Σ NLL over the scored tokens, their number), one item per forward (no padding: every model family's
    positions are right), logits in float32, the sum in float64."""
    import torch
    total, count = 0.0, 0
    for ids, scored in encoded:
        target = torch.tensor(scored[1:], device=device)
        if len(ids) < 2 or not target.any():
            continue
        x = torch.tensor([ids], device=device)
        out = model(input_ids=x, attention_mask=torch.ones_like(x))
        logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", None)
        logits = out[0] if logits is None else logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="none")
        total += float(nll[target].double().sum())
        count += int(target.sum())
    return total, count


def language_nll(model, tokenizer, texts="builtin", max_tokens: int = 256) -> float:
    """The monitor's metric, offline: mean token NLL of `model` (called text-only) on `texts` ('builtin', a jsonl
    path, or a list of items), with the model's train flags and the RNG states left as they were."""
    items = load_texts(texts) if isinstance(texts, (str, Path)) else texts
    encoded = encode_all(tokenizer, items, max_tokens)
    device = next(model.parameters()).device
    with untouched(model):
        total, count = nll_sum(model, encoded, device)
    return total / count


# ---- the Trainer callback --------------------------------------------------------------------------------------

class LanguageMonitor(TrainerCallback):
    """Evaluates `lang_nll` at step 0 and every `steps` global steps and logs it through `trainer.log`."""

    def __init__(self, trainer, cfg: LanguageMonitorConfig, items: list[dict] | None = None, tokenizer=None):
        items = cfg.validate() if items is None else items
        for name in ("processing_class", "tokenizer"):  # transformers >= 4.46, and before
            if tokenizer is None:
                tokenizer = getattr(trainer, name, None)
        if tokenizer is None:
            raise ConfigError("the language monitor needs a tokenizer and the trainer has none: pass "
                              "add_language_monitor(trainer, ..., tokenizer=tok).")
        self.trainer, self.steps = trainer, cfg.language_monitor_steps
        self.encoded = encode_all(tokenizer, items, cfg.language_monitor_max_tokens)
        self.reference = None

    def measure(self) -> float:
        t = self.trainer
        model = t.model  # what the Trainer's own eval calls: the module (ZeRO-3 gathers by hooks), FSDP's wrapper
        with untouched(model), t.compute_loss_context_manager():  # eval's autocast under mixed precision
            total, count = nll_sum(model, self.encoded, t.args.device)
        vp = getattr(t, "_vp", None)
        if vp is not None:
            vp.begin_step()  # a regularizer's capture of this forward is dropped (the next step starts afresh anyway)
        return total / count

    def _log(self, logs: dict, control) -> None:
        # The Trainer's log clears control.should_log (its callback handler does, in on_log): put it back, or the
        # loss this step was due to log would wait for the next logging step and be averaged differently.
        should_log = control.should_log
        self.trainer.log(logs)
        control.should_log = should_log

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.reference = self.measure()
            self._log({"lang_nll": self.reference, "lang_nll_delta": 0.0}, control)
            return
        # resumed: the step-0 value is in the checkpoint's log history, where this monitor put it
        self.reference = next((r["lang_nll"] for r in state.log_history if r.get("step") == 0 and "lang_nll" in r),
                              None)
        if self.reference is None:
            warnings.warn("vlm-preserve: the checkpoint's log history has no step-0 lang_nll (it was written without "
                          "the language monitor); logging lang_nll only, without lang_nll_delta.")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps == 0:
            value = self.measure()
            logs = {"lang_nll": value}
            if self.reference is not None:
                logs["lang_nll_delta"] = value - self.reference
            self._log(logs, control)


def add_language_monitor(trainer, texts: str = BUILTIN, steps: int = 50, *, max_tokens: int = 256,
                         tokenizer=None) -> LanguageMonitor:
    """Add the language monitor to `trainer` (before `trainer.train()`); `tokenizer` defaults to the trainer's.
    Undo with `trainer.remove_callback(monitor)`."""
    cfg = LanguageMonitorConfig(language_monitor=texts, language_monitor_steps=steps,
                                language_monitor_max_tokens=max_tokens)
    monitor = LanguageMonitor(trainer, cfg, tokenizer=tokenizer)
    trainer.add_callback(monitor)
    return monitor


def monitored_trainer_class(base: type, cfg: LanguageMonitorConfig, items: list[dict] | None = None) -> type:
    """A subclass of the Trainer class `base` whose instances add the monitor when constructed (for launchers and
    frameworks that build the trainer inside their own code); nothing else differs."""
    items = cfg.validate() if items is None else items

    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self.add_callback(LanguageMonitor(self, cfg, items))

    name = f"Monitored{base.__name__}"
    return type(name, (base,), {"__init__": __init__, "__qualname__": name})


def checkpoint_nll(path, texts="builtin", *, max_tokens: int = 256, use_fast: bool = True, dtype: str = "float32",
                   device: str = "cpu") -> float:
    """`language_nll` of a checkpoint folder (`vlm-preserve lang-nll`): a plain CausalLM is loaded as is; of a VLM,
    the language model is extracted first (a VLM called text-only runs exactly its language model)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .offline.checkpoints import Checkpoint
    from .offline.extract import extract_llm
    items = load_texts(texts)  # a bad text set fails before anything loads
    with tempfile.TemporaryDirectory() as tmp:
        llm = path
        if Checkpoint(path).layout != "causal-lm":
            llm = extract_llm(path, Path(tmp) / "llm")
        tok = AutoTokenizer.from_pretrained(llm, use_fast=use_fast)
        model = AutoModelForCausalLM.from_pretrained(llm, torch_dtype=getattr(torch, dtype)).to(device)
    return language_nll(model, tok, items, max_tokens)
