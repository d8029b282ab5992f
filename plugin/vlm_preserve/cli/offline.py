"""The offline checkpoint tools of `vlm-preserve`: merge, extract-llm, eval-language, lang-nll (no trainer involved)."""
from __future__ import annotations

import sys


def _floats(flag: str, text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise SystemExit(f"vlm-preserve merge: {flag} {text!r} is not a number or comma-separated list "
                         f"(e.g. 0.1 or 0.1,0.2,0.4)")


def _alphas(text: str):
    return "auto" if text.strip() == "auto" else _floats("--alpha", text)


def register(sub) -> None:
    m = sub.add_parser("merge", help="ModelMerge: theta = theta_vlm + alpha * Sparsify_K(theta_llm - theta_vlm) over "
                                     "the VLM's language model; vision tower and projector copied unchanged.")
    m.add_argument("--vlm", required=True, help="VLM checkpoint folder (upstream LLaVA/Bunny, transformers-native, NVILA).")
    m.add_argument("--base-llm", required=True, help="The plain CausalLM checkpoint the VLM was built from.")
    m.add_argument("--alpha", required=True, type=_alphas,
                   help="alpha, or a comma-separated list (one merged model per value, written in one pass), or "
                        "auto: chosen on validation items (--vqa-eval, --vqa-budget; docs/merge-auto.md).")
    m.add_argument("--density", type=lambda t: _floats("--density", t), default=[1.0],
                   help="K: fraction of each task vector kept (default 1.0); with --alpha auto, a comma-separated "
                        "list is a grid to choose from.")
    m.add_argument("--sparsify", choices=["none", "magnitude", "dare"], default="none",
                   help="none; magnitude = top-K |tau| per tensor; dare = random keep K, rescaled by 1/K.")
    m.add_argument("--seed", type=int, default=0, help="Seed of dare's masks (default 0).")
    m.add_argument("--out", required=True, help="Output folder (must not exist); with several alphas it holds "
                                                "alpha-<value>/ subfolders.")
    m.add_argument("--no-progress", action="store_true", help="No progress bar.")
    m.add_argument("--vqa-eval", help="With --alpha auto: your VQA evaluation on validation questions, a command with "
                                      "{model} for the merged folder; its last output line is the score.")
    m.add_argument("--vqa-budget", type=float, default=0.01,
                   help="With --alpha auto: the VQA drop from the VLM's score accepted (default 0.01).")
    m.add_argument("--auto-alphas", type=lambda t: _floats("--auto-alphas", t), default=None,
                   help="With --alpha auto: the alphas tried (default 0.1,0.2,0.3,0.4,0.5,0.6,0.8,1.0).")
    m.add_argument("--texts", default="builtin", help="With --alpha auto: the validation texts of the language "
                                                      "score, 'builtin' or a jsonl (as lang-nll).")
    m.add_argument("--slow-tokenizer", action="store_true", help="With --alpha auto: score language with the slow "
                                                                  "tokenizer, as upstream LLaVA trains.")
    m.add_argument("--device", default="cpu", help="With --alpha auto: where the language score runs.")

    e = sub.add_parser("extract-llm", help="Write the VLM's language model as a plain transformers CausalLM.")
    e.add_argument("vlm", help="VLM checkpoint folder.")
    e.add_argument("--out", required=True, help="Output folder (must not exist).")

    v = sub.add_parser("eval-language", help="lm-evaluation-harness on the base LLM and each VLM's extracted LLM: "
                                             "per-task scores and deltas (markdown, json) and a bar chart (PNG).")
    v.add_argument("--base", required=True, help="The base LLM checkpoint.")
    v.add_argument("--vlm", required=True, nargs="+", help="One or more VLM checkpoint folders.")
    v.add_argument("--tasks", required=True, help="Comma-separated lm-eval task names, e.g. "
                                                 "mmlu,arc_easy,arc_challenge,openbookqa.")
    v.add_argument("--limit", type=int, help="At most this many examples per task (lm-eval's --limit).")
    v.add_argument("--include-path", help="Folder of extra lm-eval task YAMLs (e.g. local task files).")
    v.add_argument("--batch-size", type=int, default=1)
    v.add_argument("--device", default="cpu")
    v.add_argument("--out", required=True, help="Output folder for the report and the extracted LLMs.")

    n = sub.add_parser("lang-nll", help="The language monitor's metric (lang_nll, mean token NLL on a text set) for "
                                        "checkpoints: the VLM's language model, called text-only.")
    n.add_argument("model", nargs="+", help="Checkpoint folders: a VLM (its LLM is extracted first) or a plain CausalLM.")
    n.add_argument("--texts", default="builtin", help="'builtin' or a jsonl path, as --language_monitor (default builtin).")
    n.add_argument("--max-tokens", type=int, default=256, help="As --language_monitor_max_tokens (default 256).")
    n.add_argument("--slow-tokenizer", action="store_true",
                   help="Load the slow tokenizer (use_fast=False), as upstream LLaVA trains: use what training used.")
    n.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    n.add_argument("--device", default="cpu")


def run(args) -> int:
    from ..config import ConfigError
    try:
        if args.command == "merge" and args.alpha == "auto":
            from ..offline.merge_auto import AUTO_ALPHAS, merge_auto
            if not args.vqa_eval:
                raise ConfigError("--alpha auto needs --vqa-eval CMD: your VQA evaluation on validation questions, "
                                  "with {model} for the merged folder, printing the score as its last line")
            merge_auto(args.vlm, args.base_llm, args.out, vqa_eval=args.vqa_eval,
                       alphas=args.auto_alphas or AUTO_ALPHAS, densities=args.density, sparsify_method=args.sparsify,
                       seed=args.seed, vqa_budget=args.vqa_budget, texts=args.texts,
                       use_fast=not args.slow_tokenizer, device=args.device, show_progress=not args.no_progress)
        elif args.command == "merge":
            from ..offline.merge import merge
            extra = [f for f in ("vqa_eval", "auto_alphas") if getattr(args, f)]
            if extra or len(args.density) != 1:
                raise ConfigError("--vqa-eval, --auto-alphas and a list of densities go with --alpha auto only; "
                                  "give one --density, or --alpha auto")
            outs = merge(args.vlm, args.base_llm, args.alpha, args.out, density=args.density[0],
                         sparsify_method=args.sparsify, seed=args.seed, show_progress=not args.no_progress)
            print("\n".join(map(str, outs)))
        elif args.command == "extract-llm":
            from ..offline.extract import extract_llm
            print(extract_llm(args.vlm, args.out))
        elif args.command == "lang-nll":
            from ..monitor import checkpoint_nll
            for path in args.model:
                value = checkpoint_nll(path, args.texts, max_tokens=args.max_tokens, use_fast=not args.slow_tokenizer,
                                       dtype=args.dtype, device=args.device)
                print(f"{path}\tlang_nll {value:.6f}")
        else:
            from ..offline.eval_language import eval_language
            report = eval_language(args.base, args.vlm, args.tasks.split(","), args.out, limit=args.limit,
                                   include_path=args.include_path, batch_size=args.batch_size, device=args.device)
            print(report.read_text())
    except ConfigError as e:
        print(f"vlm-preserve {args.command}: {e}", file=sys.stderr)
        return 2
    return 0
