"""`vlm-preserve diagnose`: each metric on planted data with a closed-form value, streamed == in-memory,
bad input → clear errors. End to end on tiny models: test_diagnose_e2e.py."""
import math

import numpy as np
import pytest
import torch

from vlm_preserve.diagnostics import metrics as M
from vlm_preserve.diagnostics.run import LayerDiagnostics, check_layers, parse_metrics
from vlm_preserve.diagnostics.samples import SampleError, load_samples, patch_labels
from vlm_preserve.regularizers.rdd import mmd2


def exact_gaussian(n, d, g):
    """n samples whose sample mean is 0 and sample covariance exactly I (whitened by their own Cholesky)."""
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    cov = x.T @ x / (n - 1)
    return x @ torch.linalg.inv(torch.linalg.cholesky(cov)).T


# ---- mixing ------------------------------------------------------------------------------------------

def test_mixing_identical_distributions_give_mmd_zero_and_the_expected_distance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    assert float(mmd2(x, x[torch.randperm(300, generator=g)])) == pytest.approx(0, abs=1e-6)
    # two independent samples of N(0, I_d): E‖x − y‖ = 2 Γ((d+1)/2) / Γ(d/2)   (x − y ~ N(0, 2 I_d))
    d = 16
    t, v = torch.randn(400, d, generator=g), torch.randn(400, d, generator=g)
    expected = 2 * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    assert float(M.mean_pairwise_distance(t, v, block=64)) == pytest.approx(expected, rel=0.03)  # sampling: ~1%
    same = float(mmd2(t, v))
    shifted = float(mmd2(t, v + 1.0))
    assert same < 0.01 and shifted > 20 * same
    # point masses: the distance is exactly ‖a − b‖
    a, b = torch.zeros(5, 3), torch.tensor([[3.0, 4.0, 0.0]]).repeat(7, 1)
    assert float(M.mean_pairwise_distance(a, b)) == pytest.approx(5.0)


def test_mixing_streamed_equals_in_memory_and_the_cap_is_a_uniform_sample():
    g = torch.Generator().manual_seed(1)
    samples = [(torch.randn(int(torch.randint(3, 20, (1,), generator=g)), 8, generator=g),
                torch.randn(16, 8, generator=g) + 0.5) for _ in range(12)]
    stats = M.MixingStats(cap=10_000)
    for t, v in samples:
        stats.update(t, v)
    r = stats.result()
    assert r["pairwise_distance"] == pytest.approx(np.mean([float(M.mean_pairwise_distance(t, v)) for t, v in samples]),
                                                   rel=1e-6)
    T, V = torch.cat([t for t, _ in samples]), torch.cat([v for _, v in samples])
    assert r["mmd2"] == pytest.approx(float(mmd2(T, V)), rel=1e-5)
    # capped: exactly `cap` distinct rows of the stream, and the estimate near the exact value
    capped = M.MixingStats(cap=64, seed=3)
    for t, v in samples:
        capped.update(t, v)
    rows = capped.visual.rows
    assert rows.shape[0] == 64 and torch.unique(rows, dim=0).shape[0] == 64
    assert all(bool((V == r).all(-1).any()) for r in rows)
    assert capped.result()["mmd2"] == pytest.approx(float(mmd2(T, V)), rel=0.35)


# ---- effdim & redundancy -----------------------------------------------------------------------------

def test_effective_dimension_of_a_planted_spectrum():
    g = torch.Generator().manual_seed(0)
    spectrum = torch.tensor([50.0, 30, 16, 2, 1, 1], dtype=torch.float64)  # 96% in the top 3
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    x = exact_gaussian(500, 6, g) * spectrum.sqrt() @ q.T + 7.0  # rotated, offset
    assert M.effective_dimension(torch.cov(x.T)) == 3
    assert M.effective_dimension(torch.eye(10)) == 10  # isotropic: 95% needs 10 of 10 (9.5 rounded up)
    assert M.effective_dimension(torch.diag(torch.tensor([95.0, 5.0]))) == 1  # exactly on the threshold


def test_redundancy_of_independent_and_equicorrelated_features():
    g = torch.Generator().manual_seed(0)
    z = exact_gaussian(400, 7, g)
    assert M.redundancy(torch.cov(z.T)) == pytest.approx(0, abs=1e-9)
    rho = 0.6  # x_i = √ρ z_0 + √(1−ρ) z_i: every pair has correlation exactly ρ
    x = math.sqrt(rho) * z[:, :1] + math.sqrt(1 - rho) * z[:, 1:]
    assert M.redundancy(torch.cov(x.T) * 3.0) == pytest.approx(rho, abs=1e-9)
    with_constant = torch.cat([x, torch.full((400, 1), 2.0, dtype=torch.float64)], 1)
    assert M.redundancy(torch.cov(with_constant.T)) == pytest.approx(rho, abs=1e-9)  # constant dim left out


def test_covariance_streamed_equals_in_memory_despite_a_large_offset():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(int(n), 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
              + 1e4 for n in torch.randint(1, 40, (15,), generator=g)]
    stats = M.CovarianceStats()
    for c in chunks:
        stats.update(c.float())
    full = torch.cat([c.float() for c in chunks]).double()
    assert torch.allclose(stats.covariance(), torch.cov(full.T), rtol=1e-9, atol=1e-9)
    r = stats.result()
    assert r["effective_dim"] == M.effective_dimension(torch.cov(full.T))
    assert r["redundancy"] == pytest.approx(M.redundancy(torch.cov(full.T)), rel=1e-9)


# ---- patch -------------------------------------------------------------------------------------------

def test_cohesion_coupling_of_perfectly_separable_objects():
    u, w = torch.tensor([1.0, 0, 0]), torch.tensor([0.5, math.sqrt(3) / 2, 0])  # cos(u, w) = 0.5
    feats = torch.stack([u * 2, u * 3, u, w, w * 5, w * 0.1, torch.tensor([0, 0, 1.0])])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, -1])  # last patch ignored
    coh, cpl = M.cohesion_coupling(feats, labels)
    assert coh == pytest.approx(1.0) and cpl == pytest.approx(0.5)
    stats = M.PatchStats()
    stats.update(feats, labels)
    assert stats.result() == pytest.approx({"cohesion": 1.0, "coupling": 0.5, "contrast": 2.0})
    # one class only: no coupling; single-patch classes: no cohesion
    assert M.cohesion_coupling(feats[:3], labels[:3])[1] is None
    assert M.cohesion_coupling(feats[[0, 3]], labels[[0, 3]]) == (None, pytest.approx(0.5))


def test_cohesion_coupling_equal_the_pairwise_definition_and_stream_over_images():
    g = torch.Generator().manual_seed(0)
    images = [(torch.randn(30, 6, generator=g), torch.randint(-1, 4, (30,), generator=g)) for _ in range(5)]

    def by_pairs(f, lab):  # PRe supplement eqs. 3-4 written as loops
        cos = torch.nn.functional.cosine_similarity(f[:, None], f[None, :], dim=-1)
        cls = [c for c in lab.unique().tolist() if c >= 0]
        within = [np.mean([float(cos[i, j]) for i in range(30) for j in range(30) if i != j and lab[i] == lab[j] == c])
                  for c in cls if int((lab == c).sum()) >= 2]
        across = [np.mean([float(cos[i, k]) for i in range(30) for k in range(30) if lab[i] == c and lab[k] == c2])
                  for c in cls for c2 in cls if c != c2]
        return np.mean(within), np.mean(across)

    stats = M.PatchStats()
    refs = []
    for f, lab in images:
        refs.append(by_pairs(f, lab))
        assert M.cohesion_coupling(f, lab) == pytest.approx(refs[-1], abs=1e-5)
        stats.update(f, lab)
    coh, cpl = np.mean([r[0] for r in refs]), np.mean([r[1] for r in refs])
    assert stats.result() == pytest.approx({"cohesion": coh, "coupling": cpl, "contrast": coh / cpl}, abs=1e-5)


def test_label_maps_pool_onto_the_patch_grid_with_the_image_geometry():
    m = np.zeros((4, 8), dtype=np.int64)  # H 4 x W 8: left half class 1, right half class 2
    m[:, 4:] = 2
    m[:, :4] = 1
    # pad: centred on an 8x8 square, rows 0-1 and 6-7 unlabeled -> 2x2 grid: each cell half labeled, half pad
    assert patch_labels(m, 4, "pad", ignore=255).reshape(4, 4).tolist() == [[-1, -1, -1, -1], [1, 1, 2, 2],
                                                                            [1, 1, 2, 2], [-1, -1, -1, -1]]
    assert patch_labels(m, 2, "crop").tolist() == [1, 2, 1, 2]  # the centred 4x4 square: columns 2..5
    assert patch_labels(m, 2, "resize").tolist() == [1, 2, 1, 2]
    m[0, 0] = 255
    assert patch_labels(m, 4, "resize").reshape(4, 4)[0].tolist() == [1, 1, 2, 2]  # majority wins over 1 ignored px


# ---- probe -------------------------------------------------------------------------------------------

def test_probe_accuracy_is_one_on_linearly_separable_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 10))
    y = ["a" if v > 0 else "b" for v in x @ rng.normal(size=10)]
    x += np.outer([3.0 if l == "a" else -3.0 for l in y], np.ones(10))  # a margin
    r = M.probe_accuracy(x, y)
    assert r["accuracy"] == 1.0 and r["folds"] == 5
    stats = M.ProbeStats()
    for row, label in zip(x, y):
        stats.update(torch.tensor(row, dtype=torch.float32).repeat(3, 1), label)  # mean-pool of 3 equal tokens
    assert stats.result()["accuracy"] == 1.0
    with pytest.raises(ValueError, match="at least 2 images per label"):
        M.probe_accuracy(x[:3], ["a", "a", "b"])
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        M.probe_accuracy(x[:3], ["a"] * 3)


# ---- the per-layer driver, and bad input -------------------------------------------------------------

def test_layer_diagnostics_routes_text_and_visual_positions_per_layer():
    g = torch.Generator().manual_seed(0)
    diag = LayerDiagnostics(["mixing", "effdim", "redundancy", "patch"], [0, 2])
    image_mask = torch.tensor([False, True, True, True, True, False, False])
    for _ in range(3):
        hs = [torch.randn(7, 4, generator=g) for _ in range(3)]
        hs[2][~image_mask] = 0.0
        hs[2][image_mask] = torch.tensor([1.0, 0, 0, 0])
        diag.update(hs, ~image_mask, image_mask, patch_labels=torch.tensor([0, 0, 1, 1]))
    r = diag.results()
    assert set(r) == {"mixing", "effdim", "redundancy", "patch"}
    assert r["mixing"]["pairwise_distance"][1] == pytest.approx(1.0)  # text at 0, visual at e_0
    assert r["patch"]["cohesion"][1] == pytest.approx(1.0) and r["patch"]["coupling"][1] == pytest.approx(1.0)
    assert len(r["effdim"]["effective_dim"]) == 2


def test_bad_input_gives_clear_errors(tmp_path):
    from helpers.diagnose_samples import write_diagnose_samples
    from vlm_preserve.diagnostics.samples import check_label_map
    from PIL import Image

    with pytest.raises(SampleError, match=r"--layers 0,40: layer 40 is out of range for a 32-layer LLM; use 0..32"):
        check_layers([0, 40], 32)
    assert check_layers(None, 4) == [0, 1, 2, 3, 4]
    with pytest.raises(SampleError, match="unknown bogus"):
        parse_metrics("mixing,bogus")

    data = write_diagnose_samples(tmp_path, n=4)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(SampleError, match="no sample with an image"):
        load_samples(tmp_path / "empty.json", tmp_path)
    (tmp_path / "textonly.json").write_text('[{"id": 1, "conversations": []}]')
    with pytest.raises(SampleError, match="no sample with an image"):
        load_samples(tmp_path / "textonly.json", tmp_path)
    samples = load_samples(data, tmp_path, need_label=True, need_mask=True)
    assert len(samples) == 4  # the text-only record is skipped
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(tmp_path / "masks" / "001.png")
    with pytest.raises(SampleError, match=r"sample s1: label map 001.png is 12x10 but the image is 40x32"):
        check_label_map(samples[1])
    from vlm_preserve.diagnostics import diagnose
    with pytest.raises(SampleError, match="label map 001.png is 12x10"):  # before any checkpoint is opened
        diagnose([str(tmp_path / "no-such-checkpoint")], str(data), metrics=["patch"], progress=False)
    import json
    records = json.loads(data.read_text())
    del records[2]["label"]
    (tmp_path / "nolabel.json").write_text(json.dumps(records))
    with pytest.raises(SampleError, match="--metrics probe needs a 'label' on every sample with an image; 1 of 4"):
        load_samples(tmp_path / "nolabel.json", tmp_path, need_label=True)
    records[0]["image"] = "images/missing.png"
    (tmp_path / "missing.json").write_text(json.dumps(records))
    with pytest.raises(SampleError, match="1 image\\(s\\) not found"):
        load_samples(tmp_path / "missing.json", tmp_path)
