"""The embedded dataset: square crops of the photos that installed packages ship.

Needs no download and no disk: the photos are PNG/JPEG files inside the scikit-image,
scikit-learn and matplotlib wheels (photos that need a `pooch` download, e.g.
`skimage.data.eagle`, are not used). Each photo is a class; `VAL_PHOTOS` are held out from
training, so validation measures reconstruction of unseen images (DESIGN §2).

Two training regimes (issue 9):
- a fixed pool (`fresh=False`, the default and `smoke`): `crops_per_image` crops per photo drawn
  once; small enough to precompute as a uint8 tensor `images` N×3×H×W in memory.
- fresh crops (`fresh=True`, `tiny`): every training sample draws a new crop from its sample
  seed, so the model never sees the same crop twice. With the 7 colour photos alone a small
  teacher memorises their patches (21.8 dB on training crops, 14.9 dB on held-out photos); what
  generalises is variety of content, so `tiny` also trains on `EXTRA_TRAIN_PHOTOS` (more colour
  photos, and greyscale photos and textures as grey RGB: edges and textures of other scenes)
  and mixes in procedural dead-leaves images (`dead_leaves.py`). `crops_per_image` is then only
  the nominal epoch length per photo (it sets how the stream permutes samples).
Validation is always the fixed pool of the held-out photos (deterministic by `seed`).

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

from sftok.data.dead_leaves import dead_leaves
from sftok.data.seeding import generator, mix

# Photos that ship inside scikit-image 0.26 (skimage/data/*.png|jpg), scikit-learn
# (datasets/images: china, flower) and matplotlib (mpl-data/sample_data: grace_hopper). The
# label of a crop is the photo's index here, so this order is part of the dataset's
# definition: append only. (`cat` is an alias of `chelsea`; `logo`, `chessboard`, `text`,
# `horse`, `phantom` are graphics or synthetic, not photos; `microaneurysms` is 102 px.)
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
    "china",
    "flower",
    "grace_hopper",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
    "page",
    "cell",
    "clock",
)
GREY_PHOTOS = frozenset({"camera", "brick", "grass", "gravel", "moon", "coins", "page", "cell",
                         "clock"})
# Held out from training. The motorcycle stereo pair stays together in training: holding out one
# view of the same scene would leak the validation set into the training set.
VAL_PHOTOS: tuple[str, ...] = ("coffee", "chelsea", "rocket")
# The training photos of the fixed pool (the first ten PHOTOS minus VAL_PHOTOS), and the ones
# `extra_photos` adds: 3 more colour photos, 9 greyscale photos / textures.
TRAIN_PHOTOS: tuple[str, ...] = tuple(p for p in PHOTOS[:10] if p not in VAL_PHOTOS)
EXTRA_TRAIN_PHOTOS: tuple[str, ...] = PHOTOS[10:]
DEAD_LEAVES_LABEL = -1  # the label of a procedural sample: no photo


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """The named photo as uint8 H×W×3 (read-only; cached per process)."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = skimage.data.stereo_motorcycle()
        photo = left if name == "motorcycle_left" else right
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        photo = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg",
                                                         asfileobj=False)) as img:
            photo = np.asarray(img.convert("RGB"))
    else:
        photo = getattr(skimage.data, name)()
    if name in GREY_PHOTOS and photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)  # grey RGB: structure without colour
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is not an RGB uint8 photo: {photo.shape} {photo.dtype}")
    photo = np.ascontiguousarray(photo)
    photo.setflags(write=False)
    return photo


def _crop_box(h: int, w: int, size: int, g: torch.Generator) -> tuple[int, int, int]:
    """(top, left, side) of one crop: side log-uniform in [max(size, shorter/8), shorter]."""
    shorter = min(h, w)
    lo, hi = min(shorter, max(size, shorter // 8)), shorter
    u, v, t = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    side = round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))
    side = max(lo, min(hi, side))
    return int(v * (h - side + 1)), int(t * (w - side + 1)), side


def photo_crops(name: str, size: int, count: int, seed: int) -> torch.Tensor:
    """`count` deterministic crops of photo `name` -> uint8 count×3×size×size."""
    photo = torch.from_numpy(load_photo(name).copy()).permute(2, 0, 1)  # 3×H×W uint8
    _, h, w = photo.shape
    g = generator(seed, PHOTOS.index(name))
    out = torch.empty(count, 3, size, size, dtype=torch.uint8)
    for k in range(count):
        top, left, side = _crop_box(h, w, size, g)
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


@functools.cache
def _pyramid(name: str) -> tuple[torch.Tensor, ...]:
    """Photo `name` as float64 1×3×H×W and antialiased halvings down to ~64 px (per process)."""
    level = torch.from_numpy(load_photo(name).copy()).permute(2, 0, 1).unsqueeze(0).double()
    levels = [level]
    while min(level.shape[-2:]) >= 128:
        level = F.interpolate(level, size=(level.shape[-2] // 2, level.shape[-1] // 2),
                              mode="bilinear", antialias=True, align_corners=False)
        levels.append(level)
    return tuple(levels)


def fresh_crop(name: str, size: int, g: torch.Generator) -> torch.Tensor:
    """One crop of photo `name` drawn from `g` -> uint8 3×size×size.

    Same crop distribution as `photo_crops`; the resize starts from the pyramid level that
    still has at least 2× the output resolution, so a crop costs ~0.2 ms instead of ~9 ms for
    a whole 1411-px photo (results differ from a full-resolution resize by rounding only).
    """
    levels = _pyramid(name)
    _, _, h, w = levels[0].shape
    top, left, side = _crop_box(h, w, size, g)
    k = 0
    while k + 1 < len(levels) and side >> (k + 1) >= 2 * size:
        k += 1
    f = 2 ** k
    side_k = max(size, round(side / f))
    top_k = min(top // f, levels[k].shape[-2] - side_k)
    left_k = min(left // f, levels[k].shape[-1] - side_k)
    crop = levels[k][:, :, top_k:top_k + side_k, left_k:left_k + side_k]
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)
    return crop[0].round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=4)
def colour_pool(photos: tuple[str, ...], seed: int, count: int = 4096) -> torch.Tensor:
    """uint8 count×3 pixels drawn uniformly from the colour photos among `photos` (the dead
    leaves' paint: natural colours, from training photos only)."""
    colour = [p for p in photos if p not in GREY_PHOTOS] or list(photos)
    g = generator(seed, 0xDEAD)
    which = torch.randint(0, len(colour), (count,), generator=g)
    out = torch.empty(count, 3, dtype=torch.uint8)
    for i, name in enumerate(colour):
        sel = (which == i).nonzero().flatten()
        photo = torch.from_numpy(load_photo(name).copy()).reshape(-1, 3)
        out[sel] = photo[torch.randint(0, photo.shape[0], (sel.numel(),), generator=g)]
    return out


class EmbeddedPhotos(Dataset):
    """Map-style dataset of (image float 3×size×size in [0, 1], label int = photo index).

    Indices [0, len(photos)·crops_per_image) are photo samples (photo = index // crops);
    with `dead_leaves` = f > 0, round(f/(1-f)·that many) procedural indices follow (label
    `DEAD_LEAVES_LABEL`), so a fraction f of every epoch is dead leaves.

    `sample(i, seed)` is the interface `TrainStream` uses. Fixed pool: the crops are drawn at
    build time and the seed is unused (the stream adds the flip). Fresh crops / dead leaves: the
    image is a pure function of the sample seed (seed None: of (dataset seed, index)), so the
    same stream seed gives the same images in every process and on every machine.
    """

    def __init__(self, photos: tuple[str, ...], image_size: int, crops_per_image: int,
                 seed: int = 0, fresh: bool = False, dead_leaves: float = 0.0):
        unknown = [p for p in photos if p not in PHOTOS]
        if unknown:
            raise ValueError(f"unknown embedded photos {unknown}; known: {', '.join(PHOTOS)}")
        if crops_per_image < 1:
            raise ValueError("crops_per_image must be >= 1")
        if not 0.0 <= dead_leaves < 1.0:
            raise ValueError(f"dead_leaves must be a fraction in [0, 1), got {dead_leaves}")
        self.photos = tuple(photos)
        self.image_size, self.crops, self.seed = image_size, crops_per_image, seed
        self.fresh = fresh
        self.num_photo_samples = len(self.photos) * crops_per_image
        self.num_dead_leaves = round(dead_leaves / (1 - dead_leaves) * self.num_photo_samples)
        if fresh:
            self.images = None  # nothing precomputed: every sample is drawn on access
            self.labels = torch.tensor([PHOTOS.index(p) for p in self.photos
                                        for _ in range(crops_per_image)])
        else:
            self.images, self.labels = _build(self.photos, image_size, crops_per_image, seed)
        if self.num_dead_leaves:
            self.labels = torch.cat([self.labels, torch.full((self.num_dead_leaves,),
                                                             DEAD_LEAVES_LABEL)])
        self.skipped = 0  # nothing to decode at access time; kept for a uniform interface

    def __len__(self) -> int:
        return self.num_photo_samples + self.num_dead_leaves

    def sample(self, index: int, seed: int | None = None) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        label = int(self.labels[index])
        if index < self.num_photo_samples and not self.fresh:
            return self.images[index].float().div_(255.0), label
        g = generator(mix(self.seed, index) if seed is None else seed, 0xC0)
        if index >= self.num_photo_samples:
            image = dead_leaves(self.image_size, colour_pool(self.photos, self.seed), g)
        else:
            image = fresh_crop(self.photos[index // self.crops], self.image_size, g)
        return image.float().div_(255.0), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.sample(index)
