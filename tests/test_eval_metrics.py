"""PSNR / SSIM against hand-computed and scikit-image reference values; token metrics by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sftok.data.uint8 import to_uint8
from sftok.evaluate.metrics import psnr, ssim
from sftok.evaluate.tokens import TokenAccumulator, codebook_entropy, codebook_usage


def _pair(seed: int = 0, size: int = 48):
    """A crop of skimage's astronaut (uint8 H×W×3) and a noisy copy."""
    img = skdata.astronaut()[100:100 + size, 180:180 + size]
    rng = np.random.default_rng(seed)
    noisy = np.clip(img.astype(np.int16) + rng.integers(-30, 31, img.shape), 0, 255).astype(np.uint8)
    return img, noisy


def _t(a: np.ndarray) -> torch.Tensor:  # H×W×3 uint8 -> 1×3×H×W
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]


def test_psnr_hand_computed():
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    y = x.clone()
    y[0, 0, 0, 0] = 12  # MSE = 144 / 12 = 12
    assert psnr(y, x).item() == pytest.approx(10 * math.log10(255 ** 2 / 12), abs=1e-12)


def test_psnr_matches_skimage_per_image():
    pairs = [_pair(s) for s in range(3)]
    x = torch.cat([_t(a) for a, _ in pairs])
    y = torch.cat([_t(b) for _, b in pairs])
    ours = psnr(y, x)
    ref = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in pairs]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)


def test_ssim_matches_skimage_defaults():
    pairs = [_pair(s, size) for s, size in ((0, 48), (1, 48), (2, 48))]
    x = torch.cat([_t(a) for a, _ in pairs])
    y = torch.cat([_t(b) for _, b in pairs])
    ours = ssim(y, x)
    ref = [structural_similarity(a, b, channel_axis=2, data_range=255) for a, b in pairs]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert ssim(x, x).numpy() == pytest.approx(1.0)


def test_ssim_non_square_small_image():
    a, b = _pair(3, 40)
    a, b = a[:16, :24], b[:16, :24]  # the tiny preset's scale
    ref = structural_similarity(a, b, channel_axis=2, data_range=255)
    assert ssim(_t(b), _t(a)).item() == pytest.approx(ref, rel=1e-10)


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-0.1, 0.0, 0.5, 1.0 / 255 * 0.49, 1.2]).reshape(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 0, 255]


def test_token_metrics_hand_made():
    # two positions, V = 3: logits [0, ln 2, 0] -> p = [1/4, 1/2, 1/4]
    logits = torch.tensor([[[0.0, math.log(2), 0.0], [0.0, math.log(2), 0.0]]])
    target = torch.tensor([[1, 2]])  # first is the argmax, second is not
    acc = TokenAccumulator(codebook_size=4)
    acc.update_step1(logits, target)
    acc.update_codes(torch.tensor([[0, 0], [1, 3]]))
    r = acc.result()
    assert r["token_top1"] == pytest.approx(0.5)
    assert r["token_ce"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert r["codebook_usage"] == pytest.approx(0.75)
    assert r["codebook_entropy"] == pytest.approx(1.5)  # H(1/2, 1/4, 1/4) in bits


def test_codebook_entropy_uniform_and_range_check():
    counts = torch.full((8,), 5)
    assert codebook_usage(counts) == 1.0
    assert codebook_entropy(counts) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        TokenAccumulator(4).update_codes(torch.tensor([4]))
