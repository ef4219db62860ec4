"""The paper's preprocessing (TiTok/SFTok): shorter edge to the crop size, then a crop.

Training: random crop (+ horizontal flip, applied by `TrainStream` so that every source flips the
same way); evaluation: centre crop. All randomness comes from an explicit `torch.Generator`, so a
sample's augmentation is a pure function of its seed and a resumed run sees the same pixels.
Images leave here as float tensors 3×H×W in [0, 1].
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter edge is `size` (bicubic, antialiased, as in TiTok)."""
    return TF.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB H×W -> float 3×H×W in [0, 1]."""
    return TF.pil_to_tensor(img).float().div_(255.0)


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """Deterministic: shorter edge to `size`, centre crop size×size -> 3×size×size."""
    return to_tensor(TF.center_crop(resize_shorter(img, size), [size, size]))


def train_transform(img: Image.Image, size: int, generator: torch.Generator) -> torch.Tensor:
    """Shorter edge to `size`, random size×size crop drawn from `generator` -> 3×size×size."""
    img = resize_shorter(img, size)
    w, h = img.size
    top = int(torch.randint(0, h - size + 1, (), generator=generator))
    left = int(torch.randint(0, w - size + 1, (), generator=generator))
    return to_tensor(img.crop((left, top, left + size, top + size)))


def hflip(image: torch.Tensor) -> torch.Tensor:
    """Mirror a 3×H×W (or B×3×H×W) image left-right."""
    return image.flip(-1)
