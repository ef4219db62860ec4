"""Reconstruction grids: a row of originals over a row of reconstructions (one grid per S)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def image_grid(originals: Tensor, reconstructions: Tensor, pad: int = 2,
               pad_value: int = 255) -> np.ndarray:
    """uint8 B×3×H×W originals and reconstructions -> uint8 (2H+3·pad)×(B·W+(B+1)·pad)×3.

    Row 1: originals, row 2: reconstructions of the same images, separated by `pad` pixels.
    """
    if originals.shape != reconstructions.shape or originals.dtype != torch.uint8:
        raise ValueError("image_grid: expects two uint8 tensors of the same shape B×3×H×W")
    b, c, h, w = originals.shape
    out = np.full((2 * h + 3 * pad, b * w + (b + 1) * pad, c), pad_value, dtype=np.uint8)
    for row, imgs in enumerate((originals, reconstructions)):
        arr = imgs.detach().cpu().permute(0, 2, 3, 1).numpy()  # B×H×W×3
        y = pad + row * (h + pad)
        for j in range(b):
            x = pad + j * (w + pad)
            out[y:y + h, x:x + w] = arr[j]
    return out
