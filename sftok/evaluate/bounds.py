"""Where a tokenizer's numbers stand: a bit-matched naive-codec floor and the teacher's ceiling.

DESIGN §1 ('Analyses'): every result is placed between
- a **floor**: a naive codec with the same bits. Downsample the image to a thumbnail with as
  many pixels as the codec has symbols (box filter: each thumbnail pixel is the mean of its
  block), replace each pixel by the nearest colour of a palette with as many colours as the
  codebook has codes, upsample bicubically. For the tokenizer that is K pixels and Q colours,
  exactly its K·log2 Q bits; for the teacher N pixels and V colours (N·log2 V bits). A learned
  tokenizer below its floor has learned less than a thumbnail.
- a **ceiling**: the teacher's reconstruction from its own codes. The tokenizer predicts
  teacher codes and decodes them with the teacher's decoder, so (until stage 3 fine-tunes a
  pixel decoder) it cannot do better.

The palettes are k-means colours of training-image thumbnails (the pixels the codec quantises,
never validation images), fitted once per data set and cached (`floor_codecs`; published
with a digest and checked when read, `sftok.storage`). Evaluation
(`evaluate(..., bounds=...)`) scores them on the same 8-bit images as the tokenizer:
`floor_tokenizer_<metric>`, `floor_teacher_<metric>`, `teacher_<metric>` for psnr, ssim, lpips,
rfid, is (the prefixes are named in `sftok.run_record`, with the rest of the metric names).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sftok.run_record import CEILING_PREFIX, floor_prefix
from sftok.storage import DamagedFileError, open_tensors, publish_tensors, rebuilding

# Bump when the codec or the palette fit changes: cached palettes of older formats are ignored.
# 2: safetensors files with a recorded digest (sftok.storage), no longer torch.save.
PALETTE_FORMAT = 2
# Training images whose thumbnails feed the k-means: enough pixels for thousands of colours
# at paper scale (1024 images × 64 px), seconds of work at CPU scale.
PALETTE_IMAGES = 1024
KMEANS_ITERS = 30


def thumbnail_shape(pixels: int) -> tuple[int, int]:
    """(h, w) with h·w == pixels and h <= w as close to square as possible (16 -> (4, 4))."""
    if pixels < 1:
        raise ValueError(f"a thumbnail needs at least 1 pixel, got {pixels}")
    h = math.isqrt(pixels)
    while pixels % h:
        h -= 1
    return h, pixels // h


def thumbnails(images: Tensor, shape: tuple[int, int]) -> Tensor:
    """B×3×H×W -> B×3×h×w, each thumbnail pixel the mean of its block (area filter)."""
    return F.interpolate(images.float(), size=shape, mode="area")


def fit_palette(pixels: Tensor, colours: int, seed: int = 0, iters: int = KMEANS_ITERS) -> Tensor:
    """k-means (Lloyd) colours of `pixels` (P×3 float) -> colours×3 float32.

    Initialised with distinct pixels drawn by `seed` (deterministic). With fewer distinct pixels
    than colours the palette is those pixels, padded by repeating the first: every input pixel
    is then represented exactly.
    """
    pixels = pixels.float().reshape(-1, 3)
    distinct = torch.unique(pixels, dim=0)
    if distinct.shape[0] <= colours:
        pad = distinct[:1].expand(colours - distinct.shape[0], 3)
        return torch.cat([distinct, pad]).contiguous()
    g = torch.Generator().manual_seed(seed)
    centres = distinct[torch.randperm(distinct.shape[0], generator=g)[:colours]].clone()
    for _ in range(iters):
        assign = torch.cdist(pixels, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, pixels)
        counts = torch.bincount(assign, minlength=colours).unsqueeze(1)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # empty: stay
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


@dataclass
class NaiveCodec:
    """Thumbnail + palette + bicubic upsampling: `bits` = h·w·log2(len(palette)).

    shape: (h, w) of the thumbnail; palette: colours×3 float in [0, 1].
    """

    shape: tuple[int, int]
    palette: Tensor

    @property
    def bits(self) -> float:
        return self.shape[0] * self.shape[1] * math.log2(self.palette.shape[0])

    def encode(self, images: Tensor) -> Tensor:
        """B×3×H×W in [0, 1] -> palette ids B×(h·w) (raster order)."""
        thumb = thumbnails(images, self.shape)  # B×3×h×w
        flat = thumb.permute(0, 2, 3, 1).reshape(-1, 3)
        ids = torch.cdist(flat, self.palette.to(flat.device)).argmin(1)
        return ids.view(images.shape[0], -1)

    def decode(self, ids: Tensor, size: tuple[int, int]) -> Tensor:
        """ids B×(h·w) -> B×3×H×W in [0, 1] (bicubic upsampling of the palette thumbnail)."""
        h, w = self.shape
        thumb = self.palette.to(ids.device)[ids].view(ids.shape[0], h, w, 3).permute(0, 3, 1, 2)
        if (h, w) == tuple(size):
            return thumb.clamp(0, 1)
        return F.interpolate(thumb, size=tuple(size), mode="bicubic",
                             align_corners=False).clamp(0, 1)

    def reconstruct(self, images: Tensor) -> Tensor:
        """B×3×H×W -> B×3×H×W: what the codec's bits can say about each image."""
        return self.decode(self.encode(images), images.shape[-2:])


@dataclass
class Bounds:
    """What `evaluate` scores beside the tokenizer: floors by name ('tokenizer', 'teacher')
    and, with `ceiling`, the teacher's reconstruction from its own codes."""

    floors: dict[str, NaiveCodec] = field(default_factory=dict)
    ceiling: bool = True

    def metric_prefixes(self) -> list[str]:
        """The metric-name prefixes `evaluate` reports these bounds under (sftok.run_record)."""
        return [floor_prefix(name) for name in self.floors] + ([CEILING_PREFIX] if self.ceiling
                                                               else [])


def _training_thumbnails(data_cfg, shapes: list[tuple[int, int]], count: int
                         ) -> list[Tensor]:
    """Thumbnails (one tensor per shape, M×3×h×w) of `count` deterministic training images."""
    from sftok.data import build_train_dataset
    from sftok.data.seeding import mix

    ds = build_train_dataset(data_cfg)
    images = []
    if hasattr(ds, "sample") and hasattr(ds, "__len__"):
        n = len(ds)
        for k in range(count):  # evenly spread over the split, each with a fixed sample seed
            index = (k * n) // count if count <= n else k % n
            images.append(ds.sample(index, mix(data_cfg.seed, 0xF100, k))[0])
    else:  # an iterable (shards): the first `count` samples
        for image, _label in ds:
            images.append(image)
            if len(images) == count:
                break
    if not images:
        raise ValueError("floor codec: the training split has no images to fit a palette on")
    batch = torch.stack(images)
    return [thumbnails(batch, s) for s in shapes]


def _cache_key(data_cfg, shape: tuple[int, int], colours: int, count: int) -> str:
    from sftok.config import to_dict

    data = to_dict(data_cfg)
    data.pop("num_workers", None)
    payload = {"format": PALETTE_FORMAT, "data": data, "shape": list(shape), "colours": colours,
               "images": count, "iters": KMEANS_ITERS}
    return "palette-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _floor_specs(cfg) -> dict[str, tuple[tuple[int, int], int]]:
    """name -> (thumbnail shape, palette colours) of the floors of an ExperimentConfig."""
    from sftok.config import proxy_grid

    tok, grid = cfg.tokenizer, proxy_grid(cfg)
    return {"tokenizer": (thumbnail_shape(tok.num_latent_tokens), tok.quantizer.codebook_size),
            "teacher": ((grid, grid), cfg.teacher.codebook_size)}


def floors_key(cfg, images: int = PALETTE_IMAGES) -> str:
    """What the floors' palettes of `cfg` depend on (configs with equal keys share them)."""
    return "+".join(_cache_key(cfg.data, shape, colours, images)
                    for shape, colours in _floor_specs(cfg).values())


def floor_codecs(cfg, cache_dir: str | os.PathLike | None = None,
                 images: int = PALETTE_IMAGES) -> dict[str, NaiveCodec]:
    """The bit-matched floors of an ExperimentConfig: 'tokenizer' (K px, Q colours) and
    'teacher' (N px, V colours); palettes cached under cache_dir/floor_palettes/ when given."""
    specs = _floor_specs(cfg)
    codecs, todo = {}, {}
    cache = Path(cache_dir) / "floor_palettes" if cache_dir is not None else None
    for name, (shape, colours) in specs.items():
        path = (cache / f"{_cache_key(cfg.data, shape, colours, images)}.safetensors"
                if cache else None)
        palette = _cached_palette(path) if path is not None and path.exists() else None
        if palette is not None:
            codecs[name] = NaiveCodec(shape, palette)
        else:
            todo[name] = (shape, colours, path)
    if todo:
        thumbs = _training_thumbnails(cfg.data, [s for s, _, _ in todo.values()], images)
        for (name, (shape, colours, path)), thumb in zip(todo.items(), thumbs):
            pixels = thumb.permute(0, 2, 3, 1).reshape(-1, 3)
            # 8-bit colours, like any image palette (and so an 8-bit colour in it is exact)
            palette = fit_palette(pixels, colours, seed=cfg.data.seed).mul(255).round().div(255)
            codecs[name] = NaiveCodec(shape, palette)
            if path is not None:  # atomic: concurrent trials never read half a file
                publish_tensors(path, {"palette": palette}, None, _PALETTE)
    return {name: codecs[name] for name in specs}


_PALETTE = "floor palette"


def _cached_palette(path: Path) -> Tensor | None:
    """A cached palette (colours×3), or None when the file is damaged (then refitted)."""
    try:
        return open_tensors(path, _PALETTE)[0]["palette"]
    except DamagedFileError as e:
        rebuilding(e, "fitting it again")
        return None


def build_bounds(cfg, cache_dir: str | os.PathLike | None = None) -> Bounds:
    """Floors and ceiling for evaluating a tokenizer trained with ExperimentConfig `cfg`."""
    return Bounds(floors=floor_codecs(cfg, cache_dir), ceiling=True)
