"""Run a model over samples and feed the per-layer statistics: the only part that touches a model.

Layers are indices into the model's `hidden_states` (`output_hidden_states=True`): 0 = the input of the
first decoder layer (text embeddings and projected visual tokens), l = the output of decoder layer l
(1-based); the last one has the LLM's final norm applied, as transformers returns it.
"""
from __future__ import annotations

import math

import torch

from ..capture import CaptureSession
from .metrics import CovarianceStats, MixingStats, PatchStats, ProbeStats
from .samples import SampleError, patch_labels, read_label_map

METRICS = ("mixing", "patch", "effdim", "redundancy", "probe")


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if names == ["all"]:
        return list(METRICS)
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise SampleError(f"--metrics {spec!r}: unknown {', '.join(bad) or '(empty)'}; choose from "
                          f"{', '.join(METRICS)} (comma-separated) or 'all'.")
    return names


def check_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    """Hidden-state indices to measure (default: all num_layers + 1); out of range is an error."""
    if layers is None:
        return list(range(num_layers + 1))
    bad = [l for l in layers if not 0 <= l <= num_layers]
    if bad or not layers:
        what = f"layer {', '.join(map(str, bad))} is out of range" if bad else "no layer given"
        raise SampleError(f"--layers {','.join(map(str, layers))}: {what} for a {num_layers}-layer LLM; use "
                          f"0..{num_layers} (0 = embeddings, l = output of decoder layer l), or omit --layers for all.")
    return sorted(set(layers))


class LayerDiagnostics:
    """The requested metrics' accumulators, one set per layer; fed one sample at a time."""

    def __init__(self, metrics: list[str], layers: list[int], *, mmd_max_tokens: int = 2048, seed: int = 0):
        self.metrics, self.layers = list(metrics), list(layers)
        want = set(metrics)
        self.stats = {l: {} for l in layers}
        for l in layers:
            if "mixing" in want:
                self.stats[l]["mixing"] = MixingStats(mmd_max_tokens, seed + l)
            if want & {"effdim", "redundancy"}:
                self.stats[l]["cov"] = CovarianceStats()
            if "patch" in want:
                self.stats[l]["patch"] = PatchStats()
            if "probe" in want:
                self.stats[l]["probe"] = ProbeStats()

    def update(self, hidden_states, text_mask: torch.Tensor, image_mask: torch.Tensor, *,
               patch_labels: torch.Tensor | None = None, label=None) -> None:
        """One sample: `hidden_states[l]` (seq, d) for every measured layer l; masks (seq,) bool."""
        for l in self.layers:
            h = hidden_states[l]
            t, v = h[text_mask], h[image_mask]
            s = self.stats[l]
            if "mixing" in s:
                s["mixing"].update(t, v)
            if "cov" in s:
                s["cov"].update(v)
            if "patch" in s:
                s["patch"].update(v, patch_labels.to(v.device))
            if "probe" in s:
                s["probe"].update(v, label)

    def results(self) -> dict:
        """{metric: {series: [value per layer]}} (probe also carries its folds and chance level)."""
        per_layer = []
        for l in self.layers:
            s, r = self.stats[l], {}
            if "mixing" in s:
                r["mixing"] = s["mixing"].result()
            if "cov" in s:
                cov = s["cov"].result()
                r["effdim"] = {"effective_dim": cov["effective_dim"]}
                r["redundancy"] = {"redundancy": cov["redundancy"]}
            if "patch" in s:
                r["patch"] = s["patch"].result()
            if "probe" in s:
                r["probe"] = s["probe"].result()
            per_layer.append(r)
        out = {}
        for m in self.metrics:
            out[m] = {k: [r[m][k] for r in per_layer] for k in per_layer[0][m]}
        return out


def _grid(n_visual: int, sample_id: str) -> int:
    g = math.isqrt(n_visual)
    if g * g != n_visual:
        raise SampleError(f"sample {sample_id}: the model inserted {n_visual} visual tokens, not a square patch grid; "
                          "the patch metric needs one token per patch of a square grid (e.g. LLaVA-1.5's 24x24; not "
                          "anyres/dynamic resolution or a kept CLS token).")
    return g


def collect(model, adapter, items, diag: LayerDiagnostics, *, progress: bool = True, desc: str = "") -> dict:
    """Feed `diag` from the model run on each item; returns `diag.results()`.

    items: iterable of (model kwargs for one sample, sample info) where info has `id`, and optionally
    `label` and `label_map` (np array, pooled here once the visual-token count is known) with `geometry`.
    Works with any adapter: its capture supplies the image and attention masks of the forward."""
    from tqdm.auto import tqdm

    session = CaptureSession()
    patches = adapter.install_capture(model, session)
    num_layers = adapter.model_dims(model)["num_layers"]
    n = 0
    try:
        with torch.no_grad():
            for batch, info in tqdm(items, desc=desc or "samples", disable=not progress, unit="sample"):
                session.begin_step()
                out = model(**batch, output_hidden_states=True)
                cap = session.take()
                if cap is None:
                    raise RuntimeError(f"sample {info.id}: the forward left no capture (no image reached the model's "
                                       "multimodal path).")
                cap.take_outputs(out)
                hs = cap.hidden_states
                if hs is None or len(hs) != num_layers + 1:
                    raise RuntimeError(f"the model returned {0 if hs is None else len(hs)} hidden states, expected "
                                       f"{num_layers + 1} ({num_layers} layers + embeddings) with output_hidden_states.")
                if hs[0].shape[0] != 1:
                    raise RuntimeError("collect runs one sample per forward; give items of batch size 1.")
                image_mask = cap.image_mask[0]
                text_mask = cap.attention_mask[0] & ~image_mask
                labels = None
                if "patch" in diag.metrics:
                    g = _grid(int(image_mask.sum()), info.id)
                    labels = torch.from_numpy(patch_labels(info.label_map(), g, info.geometry, info.ignore))
                diag.update([h[0] for h in hs], text_mask, image_mask, patch_labels=labels,
                            label=getattr(info, "label", None))
                n += 1
    finally:
        patches.undo()
    if n == 0:
        raise SampleError("no sample was run (the sample set is empty).")
    return diag.results()


def diagnose(checkpoints: list[str], data: str, *, image_folder=None, metrics=METRICS, layers=None,
             names: list[str] | None = None, device="cpu", dtype=torch.float32, mmd_max_tokens: int = 2048,
             mask_ignore: int = 255, mask_geometry: str | None = None, conv_template: str = "v1", limit: int = 0,
             progress: bool = True, seed: int = 0) -> dict:
    """Every checkpoint over the same samples. Returns the report dict (see report.write_report)."""
    from .models import open_checkpoint
    from .samples import check_label_map, load_samples

    metrics = list(metrics)
    require_packages(metrics)
    samples = load_samples(data, image_folder, need_label="probe" in metrics, need_mask="patch" in metrics,
                           limit=limit)
    if "patch" in metrics:  # every label map checked before any model loads
        for s in samples:
            check_label_map(s).close()
    names = names or [_name(c) for c in checkpoints]
    if len(names) != len(checkpoints) or len(set(names)) != len(names):
        raise SampleError(f"checkpoint names {names} for {len(checkpoints)} checkpoints: give one unique name each "
                          "(--names).")
    report = {"checkpoints": names, "paths": [str(c) for c in checkpoints], "samples": len(samples),
              "metrics": metrics, "results": {}}
    for name, ckpt in zip(names, checkpoints):
        backend = open_checkpoint(ckpt, data, image_folder, device=device, dtype=dtype, conv_template=conv_template)
        num_layers = backend.adapter.model_dims(backend.model)["num_layers"]
        measured = check_layers(layers, num_layers)
        if report.get("layers", measured) != measured:
            raise SampleError(f"{ckpt} has {num_layers} layers, unlike the checkpoints before it; compare "
                              "checkpoints of one architecture, or pass --layers valid for all.")
        report["layers"] = measured
        geometry = mask_geometry or backend.geometry
        items = ((backend.batch(s), SampleInfo(s, geometry, mask_ignore)) for s in samples)
        diag = LayerDiagnostics(metrics, measured, mmd_max_tokens=mmd_max_tokens, seed=seed)
        report["results"][name] = collect(backend.model, backend.adapter, _sized(items, len(samples)), diag,
                                          progress=progress, desc=name)
        del backend
    return report


def require_packages(metrics) -> None:
    """Fail before any model loads, not after an hour of forwards, if the plots or the probe cannot run."""
    import importlib.util
    need = ["matplotlib"] + (["scikit-learn"] if "probe" in metrics else [])
    missing = [p for p in need if importlib.util.find_spec(p.replace("scikit-learn", "sklearn")) is None]
    if missing:
        raise ImportError(f"vlm-preserve diagnose needs {' and '.join(missing)} (plots{', probe' if 'probe' in metrics else ''}): "
                          "pip install 'vlm-preserve-plugin[diagnose]'  (or pip install " + " ".join(missing) + ")")


class SampleInfo:
    """What collect() needs of a sample besides the model input."""

    def __init__(self, sample, geometry, ignore):
        self.id, self.label, self.geometry, self.ignore = sample.id, sample.label, geometry, ignore
        self.label_map = lambda: read_label_map(sample)


class _sized:
    """A generator with a length, so the progress bar shows a total."""
    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self):
        return self.n


def _name(path) -> str:
    from pathlib import Path
    p = Path(path).resolve()
    return p.name if not p.name.startswith("checkpoint-") else f"{p.parent.name}/{p.name}"
