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
    """The identity of a sequence of uint8 images (checks that a cache fits the data): sha256
    over the images' own sha256 digests, in order. Per image, so the batching does not change
    it, and mergeable, so ranks that each saw some batches of an evaluation agree with one
    process that saw them all: `update(images, key=b)` files batch b's digests under b, and
    `hexdigest()` reads them in key order (keyless updates: in the order made)."""

    def __init__(self):
        self._parts: list[tuple[int, int, list[bytes]]] = []  # (key, arrival, digests)

    def update(self, images_u8: Tensor, key: int | None = None) -> None:
        x = images_u8.detach().cpu().contiguous()
        digests = [hashlib.sha256(img.numpy().tobytes()).digest() for img in x]
        n = len(self._parts)
        self._parts.append((n if key is None else key, n, digests))

    def merge(self, other: ContentHash) -> None:
        """Add the batches another rank saw (keys are global batch indices)."""
        self._parts += other._parts

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for _, _, digests in sorted(self._parts, key=lambda p: p[:2]):
            for d in digests:
                h.update(d)
        return h.hexdigest()
