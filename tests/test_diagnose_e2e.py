"""`vlm-preserve diagnose` end to end on tiny checkpoints of two adapters: upstream LLaVA (llava environment)
and a transformers-native LlavaForConditionalGeneration (transformers environment), two checkpoints each,
every metric; the JSON, the PNGs (opened and looked at) and the summary. The generic adapter gives the
same numbers as the native one on the same model."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import needs_llava
from vlm_preserve.cli import main
from vlm_preserve.diagnostics import METRICS
from helpers.diagnose_samples import write_diagnose_samples

PANELS = {"mixing": 2, "patch": 3, "effdim": 1, "redundancy": 1, "probe": 1}


def check_outputs(out, names, num_layers, n_samples):
    report = json.loads((out / "diagnose.json").read_text())
    assert report["checkpoints"] == names and report["samples"] == n_samples
    assert report["layers"] == list(range(num_layers + 1))
    for name in names:
        r = report["results"][name]
        assert set(r) == set(METRICS)
        for metric, series in r.items():
            for s, values in series.items():
                assert len(values) == num_layers + 1, (metric, s)
                assert all(v is not None and math.isfinite(v) for v in values), (name, metric, s, values)
        assert all(0 <= a <= 1 for a in r["probe"]["accuracy"])
        assert all(1 <= k <= 32 for k in r["effdim"]["effective_dim"])
    a, b = (report["results"][n]["mixing"]["mmd2"] for n in names)
    assert a != b  # two different checkpoints, two different curves
    from PIL import Image
    for metric, panels in PANELS.items():
        img = np.asarray(Image.open(out / f"{metric}.png").convert("RGB")).astype(int)
        assert img.shape == (360, 500 * panels, 3), metric
        assert img.std() > 10, f"{metric}.png looks blank"
        # a line per checkpoint, in matplotlib's first two colours
        for colour in ((31, 119, 180), (255, 127, 14)):
            assert (np.abs(img - colour).sum(-1) < 30).sum() > 50, (metric, colour)
    summary = (out / "summary.md").read_text()
    assert all(n in summary for n in names) and "## patch: intra-object cohesion" in summary


@needs_llava
def test_upstream_llava_checkpoints_end_to_end(tiny_llava, tmp_path, capsys):
    from helpers.llava_models import save_checkpoint

    ckpts = [save_checkpoint(tiny_llava, tmp_path / name, seed) for name, seed in (("early", 0), ("late", 1))]
    data = write_diagnose_samples(tmp_path / "data", n=8)
    argv = ["diagnose", "--model", *map(str, ckpts), "--data", str(data), "--metrics", "all", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 0
    check_outputs(tmp_path / "out", ["early", "late"], num_layers=4, n_samples=8)
    capsys.readouterr()
    assert main(argv[:3] + argv[4:] + ["--out", str(tmp_path / "bad"), "--layers", "0,9"]) == 2
    assert "--layers 0,9: layer 9 is out of range for a 4-layer LLM; use 0..4" in capsys.readouterr().err


transformers = pytest.importorskip("transformers")
native = pytest.mark.skipif(not hasattr(transformers, "AutoModelForImageTextToText"),
                            reason="needs transformers with AutoModelForImageTextToText (the transformers environment)")


@native
def test_transformers_native_checkpoints_end_to_end(tmp_path, capsys):
    from helpers.native_models import save_llava_checkpoint

    ckpts = [save_llava_checkpoint(tmp_path / name, seed) for name, seed in (("a", 0), ("b", 1))]
    data = write_diagnose_samples(tmp_path / "data", n=8)
    assert main(["diagnose", "--model", *map(str, ckpts), "--names", "step0", "step100", "--data", str(data),
                 "--metrics", "all", "--out", str(tmp_path / "out")]) == 0
    assert "step0" in capsys.readouterr().err  # the progress bar, named by checkpoint
    check_outputs(tmp_path / "out", ["step0", "step100"], num_layers=4, n_samples=8)
    (tmp_path / "data" / "empty.json").write_text("[]")
    assert main(["diagnose", "--model", str(ckpts[0]), "--data", str(tmp_path / "data" / "empty.json"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "no sample with an image" in capsys.readouterr().err


@native
def test_generic_adapter_gives_the_native_adapters_numbers(tmp_path):
    from helpers.native_models import save_llava_checkpoint
    from vlm_preserve import GenericAdapter
    from vlm_preserve.diagnostics import LayerDiagnostics, collect
    from vlm_preserve.diagnostics.models import TransformersNative
    from vlm_preserve.diagnostics.run import SampleInfo
    from vlm_preserve.diagnostics.samples import load_samples

    backend = TransformersNative(save_llava_checkpoint(tmp_path / "ckpt"), device="cpu", dtype=torch.float32)
    samples = load_samples(write_diagnose_samples(tmp_path / "data", n=4), tmp_path / "data")
    metrics = ["mixing", "patch", "effdim", "redundancy"]
    generic = GenericAdapter(embed="model.language_model.embed_tokens", projector="model.multi_modal_projector",
                             layers="model.language_model.layers",
                             image_token_id=backend.model.config.image_token_id)
    results = []
    for adapter in (backend.adapter, generic):
        items = [(backend.batch(s), SampleInfo(s, backend.geometry, 255)) for s in samples]
        results.append(collect(backend.model, adapter, items, LayerDiagnostics(metrics, [0, 2, 4]), progress=False))
    for m in metrics:
        for s in results[0][m]:
            assert results[1][m][s] == pytest.approx(results[0][m][s], rel=1e-5), (m, s)
