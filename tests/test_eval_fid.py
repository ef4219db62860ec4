"""Fréchet distance, streaming statistics, the torch-fidelity path, and the offline rule."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from test_eval_helpers import fake_images, register_tiny_extractor

from sftok.evaluate.fid import (
    INCEPTION_ENV,
    INCEPTION_FILENAME,
    INCEPTION_NAME,
    FeatureStats,
    FidelityFeatures,
    fid_from_statistics,
    find_inception_weights,
    frechet_distance,
    inception_score,
)


def _scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_known_gaussians():
    d = 5
    mu = np.arange(d, dtype=float)
    # N(0, I) vs N(mu, s² I): |mu|² + d (1 − s)²
    assert frechet_distance(np.zeros(d), np.eye(d), mu, 4 * np.eye(d)) == pytest.approx(
        mu @ mu + d * (1 - 2) ** 2)
    # diagonal covariances: Σ (σ1 − σ2)²
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    assert frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(
        ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu, np.eye(d), mu, np.eye(d)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_random_features_vs_scipy_and_torch_fidelity():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(200, 12))
    f2 = rng.normal(size=(150, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    ref = _scipy_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    tf = fid_from_statistics({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2})
    assert tf == pytest.approx(ref, rel=1e-8)


def test_feature_stats_streaming_equals_numpy():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(37, 6)) * 3 + 1
    st = FeatureStats()
    for chunk in np.array_split(f, 4):
        st.update(torch.from_numpy(chunk).float())
    f32 = f.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(st.mu, f32.mean(0), rtol=1e-10)
    np.testing.assert_allclose(st.sigma, np.cov(f32, rowvar=False), rtol=1e-8, atol=1e-10)
    assert st.n == 37


def test_torch_fidelity_end_to_end_with_tiny_extractor():
    """Our streaming path (features -> sums -> torch-fidelity's metric functions) gives the
    numbers of torch-fidelity's own calculate_metrics on the same uint8 datasets."""
    import torch_fidelity

    name = register_tiny_extractor()
    real = (fake_images(40, seed=0) * 255).round().to(torch.uint8)
    fake = (fake_images(40, seed=1) * 255).round().to(torch.uint8)

    feats = FidelityFeatures(name)
    ref, rec, logits = FeatureStats(), FeatureStats(), []
    for i in range(0, 40, 16):  # odd chunking on purpose
        ref.update(feats(real[i:i + 16])[0])
        f, lg = feats(fake[i:i + 16])
        rec.update(f)
        logits.append(lg)
    ours_fid = fid_from_statistics(ref.statistics(), rec.statistics())
    ours_is, _ = inception_score(torch.cat(logits))

    class _DS(torch.utils.data.Dataset):
        def __init__(self, t):
            self.t = t

        def __len__(self):
            return len(self.t)

        def __getitem__(self, i):
            return self.t[i]

    tf = torch_fidelity.calculate_metrics(
        input1=_DS(fake), input2=_DS(real), fid=True, isc=True, feature_extractor=name,
        cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=16)
    assert ours_fid == pytest.approx(tf["frechet_inception_distance"], rel=1e-4, abs=1e-6)
    assert ours_is == pytest.approx(tf["inception_score_mean"], rel=1e-5)
    assert ours_fid > 0 and ours_is >= 1.0


def test_inception_weights_offline(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path, msg = find_inception_weights()
    assert path is None
    assert INCEPTION_ENV in msg and INCEPTION_FILENAME in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError):  # never falls through to a download
        FidelityFeatures(INCEPTION_NAME, None)
    # an explicit path that does not exist is named in the message
    path, msg = find_inception_weights(str(tmp_path / "nope.pth"))
    assert path is None and "nope.pth" in msg
    # found through the environment variable, then through the hub cache
    f = tmp_path / INCEPTION_FILENAME
    f.write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_ENV, str(f))
    assert find_inception_weights() == (f, "")
    monkeypatch.delenv(INCEPTION_ENV)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILENAME).write_bytes(b"x")
    assert find_inception_weights()[0] == hub / INCEPTION_FILENAME
