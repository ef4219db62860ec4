"""Webdataset shards, the layout TiTok/SFTok train from: tar files whose samples hold an encoded
image (`jpg`/`jpeg`/`png`/`webp`) and a class id (`cls`, ASCII integer; absent -> label 0).

`ShardDataset` is an IterableDataset with the same preprocessing and corrupt-sample policy as the
image folder. Training order: shards permuted by (seed, epoch), split across ranks (when
torch.distributed is initialised) and DataLoader workers, then a shuffle buffer seeded by
(seed, epoch, rank, worker); crop and flip from a seed per (seed, epoch, rank, worker, sample).
Evaluation: shards in the given order, no shuffling, centre crops.

Resume is approximate (`TrainStream`): the stream restarts the epoch and each process drops its
share of the samples already consumed, before decoding. With one process and no corrupt samples
this reproduces the uninterrupted stream exactly; with several workers the split of the dropped
samples between workers, and skipped corrupt samples, can shift it by a few samples.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from sftok.config import ConfigError
from sftok.data.decode import DECODE_ERRORS, SkipLog, load_rgb
from sftok.data.seeding import generator
from sftok.data.transforms import eval_transform, hflip, train_transform

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _webdataset():
    """The webdataset module, imported only when shards are read: the rest of `sftok.data`
    works without it (e.g. on a GPU image that lacks it)."""
    try:
        import webdataset
    except ImportError as e:
        raise ModuleNotFoundError(f"webdataset shards need the webdataset package ({e}); "
                                  "pip install -r requirements.lock, or use an image folder",
                                  name="webdataset") from None
    return webdataset


def expand_shards(spec: str | Sequence[str], field: str = "data.path") -> list[str]:
    """Brace pattern(s) or a list -> shard URLs; local files must exist (ConfigError names `field`)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for s in specs for u in _webdataset().shardlists.expand_urls(s)]
    if not urls:
        raise ConfigError(field, f"no shards in {spec!r}; give a brace pattern such as "
                                 f"/data/imagenet-train-{{0000..0255}}.tar or a list of tar files")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:")
               and not os.path.isfile(u)]
    if missing:
        raise ConfigError(field, f"{len(missing)} of {len(urls)} shard(s) not found, first: "
                                 f"{missing[0]!r}; fix {field} (a brace pattern or list of tars)")
    return urls


class ShardDataset(IterableDataset):
    """Iterable of (image float 3×size×size in [0, 1], label int) from webdataset tar shards."""

    def __init__(self, urls: str | Sequence[str], image_size: int, train: bool = False,
                 seed: int = 0, shuffle_buffer: int = 1000, field: str = "data.path"):
        self.urls = expand_shards(urls, field)
        self.image_size = image_size
        self.train = train
        self.shuffle_buffer = shuffle_buffer
        self.skip_log = SkipLog(f"{field} shards")
        # Set through `configured()` by TrainStream; plain iteration is epoch 0 from the start.
        self.seed, self.epoch, self.skip, self.flip = seed, 0, 0, train

    @property
    def skipped(self) -> int:
        """Undecodable samples met so far (in this process)."""
        return self.skip_log.count

    def configured(self, **changes) -> ShardDataset:
        """A shallow copy with seed / epoch / skip / flip changed (the original is untouched)."""
        view = copy.copy(self)
        for k, v in changes.items():
            if k not in ("seed", "epoch", "skip", "flip"):
                raise TypeError(f"unknown setting {k!r}")
            setattr(view, k, v)
        return view

    def _process_slot(self) -> tuple[int, int]:
        """(slot, slots) of this process among ranks × DataLoader workers."""
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return rank * nw + wid, world * nw

    def _raw(self, slot: int, slots: int) -> Iterator[dict]:
        urls = self.urls
        if self.train:
            order = torch.randperm(len(urls), generator=generator(self.seed, self.epoch))
            urls = [urls[i] for i in order]
        urls = urls[slot::slots]

        def on_error(e: Exception) -> bool:  # a truncated or unreadable tar: skip, go on
            self.skip_log.record(f"{getattr(e, 'args', [''])[-1]}", e)
            return True

        samples = _webdataset().tariterators.tarfile_samples(({"url": u} for u in urls),
                                                             handler=on_error)
        if not self.train or self.shuffle_buffer <= 1:
            yield from samples
            return
        # Reservoir-style shuffle buffer; its randomness is seeded, so the order is reproducible.
        g = generator(self.seed, self.epoch, slot, 1)
        buffer: list[dict] = []
        for s in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(s)
                continue
            j = int(torch.randint(len(buffer), (), generator=g))
            buffer[j], s = s, buffer[j]
            yield s
        while buffer:
            yield buffer.pop(int(torch.randint(len(buffer), (), generator=g)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        slot, slots = self._process_slot()
        # This process's share of the samples consumed before a resume (dropped undecoded).
        to_skip = self.skip // slots + (1 if slot < self.skip % slots else 0)
        for count, s in enumerate(self._raw(slot, slots)):
            if count < to_skip:
                continue
            name = f"{s.get('__url__', '?')}:{s.get('__key__', '?')}"
            key = next((k for k in IMAGE_KEYS if k in s), None)
            try:
                if key is None:
                    raise ValueError(f"no image entry ({'/'.join(IMAGE_KEYS)}) in sample")
                img = load_rgb(s[key])
                label = int(s["cls"].decode().strip()) if "cls" in s else 0
            except DECODE_ERRORS as e:
                self.skip_log.record(name, e)
                continue
            if self.train:
                g = generator(self.seed, self.epoch, slot, count, 2)
                image = train_transform(img, self.image_size, g)
                if self.flip and bool(torch.rand((), generator=g) < 0.5):
                    image = hflip(image)
            else:
                image = eval_transform(img, self.image_size)
            yield image, label
