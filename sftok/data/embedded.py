"""The embedded dataset: deterministic square crops of colour photos shipped with scikit-image.

Needs no download and no disk: the photos are PNG/JPEG files inside the scikit-image wheel
(photos that need a `pooch` download, e.g. `skimage.data.eagle`, are not used). Each photo is a
class; `VAL_PHOTOS` are held out from training, so validation measures reconstruction of unseen
images (DESIGN §2). A split is small enough to precompute: `images` is a uint8 tensor
N×3×H×W in memory and items are converted to float on access.

Crops: per photo, a `torch.Generator` seeded with mix(seed, label) draws side length
log-uniformly between max(size, shorter/8) and the shorter side (textures down to whole scenes),
then a uniform position. Each crop is resized to size×size with an antialiased bilinear filter in
float64 and rounded to uint8; the rounding makes last-ulp differences between CPUs vanish, so the
same seed gives bit-identical images on every machine. A photo's k-th crop does not depend on how
many crops are asked for, nor on which other photos are in the split.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sftok.data.seeding import generator

# Colour photos that ship inside scikit-image 0.26 (skimage/data/*.png|jpg). The label of a crop
# is the photo's index here, so this order is part of the dataset's definition: append only.
# (`cat` is an alias of `chelsea`; `logo`, `chessboard` are graphics, not photos.)
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
)
# Held out from training. The motorcycle stereo pair stays together in training: holding out one
# view of the same scene would leak the validation set into the training set.
VAL_PHOTOS: tuple[str, ...] = ("coffee", "chelsea", "rocket")
TRAIN_PHOTOS: tuple[str, ...] = tuple(p for p in PHOTOS if p not in VAL_PHOTOS)


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """The named photo as uint8 H×W×3 (read-only; cached per process)."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = skimage.data.stereo_motorcycle()
        photo = left if name == "motorcycle_left" else right
    else:
        photo = getattr(skimage.data, name)()
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is not an RGB uint8 photo: {photo.shape} {photo.dtype}")
    photo = np.ascontiguousarray(photo)
    photo.setflags(write=False)
    return photo


def photo_crops(name: str, size: int, count: int, seed: int) -> torch.Tensor:
    """`count` deterministic crops of photo `name` -> uint8 count×3×size×size."""
    photo = torch.from_numpy(load_photo(name).copy()).permute(2, 0, 1)  # 3×H×W uint8
    _, h, w = photo.shape
    shorter = min(h, w)
    lo, hi = min(shorter, max(size, shorter // 8)), shorter
    g = generator(seed, PHOTOS.index(name))
    out = torch.empty(count, 3, size, size, dtype=torch.uint8)
    for k in range(count):
        u, v, t = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        side = round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))
        side = max(lo, min(hi, side))
        top, left = int(v * (h - side + 1)), int(t * (w - side + 1))
        crop = photo[:, top:top + side, left:left + side].unsqueeze(0).double()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)
        out[k] = crop[0].round_().clamp_(0, 255).to(torch.uint8)
    return out


@functools.lru_cache(maxsize=8)
def _build(photos: tuple[str, ...], size: int, crops: int, seed: int):
    # Cached: the teacher stage and every tokenizer stage of a trial build the same split.
    images = torch.cat([photo_crops(p, size, crops, seed) for p in photos])
    labels = torch.tensor([PHOTOS.index(p) for p in photos for _ in range(crops)])
    return images, labels


class EmbeddedPhotos(Dataset):
    """Map-style dataset of (image float 3×size×size in [0, 1], label int = photo index).

    `sample(i, seed)` is the interface `TrainStream` uses; the crops are already randomised at
    build time, so the per-sample seed is unused (the stream adds the flip).
    """

    def __init__(self, photos: tuple[str, ...], image_size: int, crops_per_image: int,
                 seed: int = 0):
        unknown = [p for p in photos if p not in PHOTOS]
        if unknown:
            raise ValueError(f"unknown embedded photos {unknown}; known: {', '.join(PHOTOS)}")
        if crops_per_image < 1:
            raise ValueError("crops_per_image must be >= 1")
        self.photos = tuple(photos)
        self.image_size = image_size
        self.images, self.labels = _build(self.photos, image_size, crops_per_image, seed)
        self.skipped = 0  # nothing to decode at access time; kept for a uniform interface

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, index: int, seed: int | None = None) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.sample(index)
