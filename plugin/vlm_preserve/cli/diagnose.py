"""`vlm-preserve diagnose`: the flags, and the call into vlm_preserve.diagnostics."""
from __future__ import annotations

import sys

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(sub) -> None:
    d = sub.add_parser("diagnose", help="Measure representation mixing and visual degradation per LLM layer "
                                        "for one or more checkpoints (JSON, one PNG per metric, summary.md).")
    d.add_argument("--model", nargs="+", required=True, metavar="CKPT",
                   help="Checkpoint directories (upstream LLaVA or transformers VLM); one curve each.")
    d.add_argument("--data", required=True, help="Samples: LLaVA data json; optional 'label' (probe) and 'mask' "
                                                 "(segmentation PNG, patch) per sample. See docs/diagnostics.md.")
    d.add_argument("--image-folder", help="Folder that image and mask paths are relative to (default: the json's).")
    d.add_argument("--metrics", default="mixing,effdim,redundancy",
                   help="Comma-separated: mixing, patch, effdim, redundancy, probe, or 'all' "
                        "(default mixing,effdim,redundancy: the ones needing no label or mask).")
    d.add_argument("--out", required=True, help="Output directory.")
    d.add_argument("--layers", help="Comma-separated hidden-state indices (0 = embeddings, l = output of decoder "
                                    "layer l); default all.")
    d.add_argument("--names", nargs="+", help="A label per checkpoint for plots (default: directory names).")
    d.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default cpu).")
    d.add_argument("--dtype", default="float32", choices=DTYPES, help="Model dtype; statistics are fp32/fp64 anyway.")
    d.add_argument("--mmd-max-tokens", type=int, default=2048,
                   help="MMD² uses a uniform sample of at most this many tokens per modality per layer (default 2048).")
    d.add_argument("--mask-ignore", type=int, default=255, help="Label-map value meaning 'unlabeled' (default 255).")
    d.add_argument("--mask-geometry", choices=("pad", "crop", "resize"),
                   help="How images reach the patch grid (default: from the checkpoint's preprocessing).")
    d.add_argument("--conv-template", default="v1", help="Upstream LLaVA conversation template (default v1).")
    d.add_argument("--limit", type=int, default=0, help="Only the first N samples with an image (0 = all).")
    d.add_argument("--no-progress", action="store_true", help="No progress bar.")


def run(args) -> int:
    import torch

    from ..diagnostics import diagnose, write_report
    from ..diagnostics.run import parse_metrics
    from ..diagnostics.samples import SampleError

    try:
        layers = None
        if args.layers:
            try:
                layers = [int(x) for x in args.layers.split(",") if x.strip()]
            except ValueError:
                raise SampleError(f"--layers {args.layers!r}: expected comma-separated integers, e.g. 0,8,16.")
        report = diagnose(args.model, args.data, image_folder=args.image_folder, metrics=parse_metrics(args.metrics),
                          layers=layers, names=args.names, device=args.device, dtype=getattr(torch, args.dtype),
                          mmd_max_tokens=args.mmd_max_tokens, mask_ignore=args.mask_ignore,
                          mask_geometry=args.mask_geometry, conv_template=args.conv_template, limit=args.limit,
                          progress=not args.no_progress)
    except (SampleError, ImportError) as e:
        print(f"vlm-preserve diagnose: {e}", file=sys.stderr)
        return 2
    paths = write_report(report, args.out)
    print(f"[diagnose] {report['samples']} samples x {len(report['checkpoints'])} checkpoint(s), "
          f"layers {report['layers'][0]}..{report['layers'][-1]}: {paths['json']}, {paths['summary']}, "
          + ", ".join(str(p) for p in paths["plots"].values()))
    return 0
