"""Pixel metrics: PSNR and SSIM, batched in torch (paper Table 1 reports PSNR/SSIM beside rFID).

Both take uint8 images B×3×H×W (what a saved PNG holds: evaluation quantises reconstructions
and originals to 8 bits once with `sftok.data.uint8.to_uint8`, so every metric sees the same
pixels) and return one value per image (B,); callers average over images.

SSIM reproduces `skimage.metrics.structural_similarity` with its defaults for colour images
(7×7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the valid region and
channels; data range 255), so it is comparable with the values people get from scikit-image —
but runs batched on the evaluation device instead of one image at a time on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Per-image MSE floor: identical images would give PSNR = inf and poison the mean; with this
# floor they give 10·log10(255² / 1e-10) ≈ 148 dB (documented, never reached in practice).
_MSE_FLOOR = 1e-10


def psnr(x: Tensor, y: Tensor, data_range: float = 255.0) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    x, y: B×C×H×W (uint8, or float on the scale of `data_range`). Returns float64 (B,).
    PSNR = 10·log10(data_range² / MSE), MSE over all pixels and channels of one image.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    diff = x.double() - y.double()
    mse = diff.pow(2).flatten(1).mean(1).clamp_min(_MSE_FLOOR)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim(x: Tensor, y: Tensor, data_range: float = 255.0, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Structural similarity per image (scikit-image defaults, see module docstring).

    x, y: B×C×H×W with H, W >= win_size. Returns float64 (B,): the mean SSIM map over the
    region where the win_size×win_size window lies fully inside the image, averaged over
    channels (skimage crops (win_size-1)/2 pixels at each border, which is exactly a valid,
    unpadded box filter).
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} smaller than the {win_size}-pixel window")
    x, y = x.double(), y.double()
    b, c = x.shape[:2]

    def box(t: Tensor) -> Tensor:  # mean over each fully-inside window, per channel
        return F.avg_pool2d(t, win_size, stride=1)

    ux, uy = box(x), box(y)
    uxx, uyy, uxy = box(x * x), box(y * y), box(x * y)
    n = win_size * win_size
    cov_norm = n / (n - 1)  # sample covariance, as skimage's use_sample_covariance=True
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(b, c, -1).mean(-1).mean(-1)
