"""8-bit images: the pixels every metric, cache check and saved PNG sees.

Evaluation quantises reconstructions and originals to 8 bits once (`to_uint8`), as a saved PNG
holds them; caches keyed by a data set check that their entry was computed on the same images by
a hash of those bytes (`ContentHash`: FID reference statistics, the generator's token cache).
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """float B×3×H×W in [0, 1] -> uint8 B×3×H×W (clamp, ×255, round half to even)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


class ContentHash:
    """sha256 over the uint8 bytes of a stream of images (checks that a cache fits the data)."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, images_u8: Tensor) -> None:
        self._h.update(images_u8.detach().cpu().contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()
