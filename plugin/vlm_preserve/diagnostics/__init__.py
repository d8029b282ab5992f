"""`vlm-preserve diagnose`: representation mixing and visual degradation, layer by layer, per checkpoint.

    metrics.py   the metrics, pure torch/numpy, with streaming accumulators (no model, no adapter)
    samples.py   the samples json (LLaVA format + optional label / mask) and label-map pooling
    models.py    open a checkpoint (upstream LLaVA or transformers-native) and build each sample's input
    run.py       run a model over samples through its adapter's capture; feed the accumulators
    report.py    diagnose.json, one PNG per metric, summary.md

Definitions and which paper equation each follows: docs/diagnostics.md.
"""
from .metrics import (cohesion_coupling, effective_dimension, mean_pairwise_distance, probe_accuracy,
                      redundancy)
from .run import METRICS, LayerDiagnostics, collect, diagnose
from .report import write_report

__all__ = ["METRICS", "LayerDiagnostics", "collect", "diagnose", "write_report", "cohesion_coupling",
           "effective_dimension", "mean_pairwise_distance", "probe_accuracy", "redundancy"]
