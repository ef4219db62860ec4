"""Teacher ids computed once for a finite pool of training images (issue 10).

Stages 1-2 train against the frozen teacher's ids M_g of every training image. When the
training images come from a finite, fixed pool (today's embedded crops; an image folder with
`data.train_crop=center`, i.e. centre crop + flip), encoding them at every step repeats the same
work over and over: at paper scale the teacher's encoder is a large share of a step.

The protocol: a map-style dataset declares itself a finite, deterministic pool by a method
`pool_key() -> str | None` returning a string that identifies its images exactly (None: not a
pool). The contract: `sample(i, seed)` is the same image for every seed, so the only variation
left is the stream's horizontal flip. For such a pool `TeacherIdCache.build` encodes every
image and its mirror once, in fixed chunks in index order (so the ids do not depend on who built
the cache), and the cache is stored beside the teacher (`<teacher cache>/ids/`), published whole
with its digest and checked when read (`sftok.storage`; a damaged file is rebuilt).

Lookup is by content, not by index: a training batch's images are matched to the pool by a
digest of their bytes. That needs nothing from the data stream (indices and flips need not be
carried along), and it cannot give wrong ids: an image that is not in the pool (a dataset whose
declaration is wrong, a stream that augments further) is a miss, and a batch with any miss is
encoded on the fly as before. Datasets that do not declare a pool (random crops of real data,
webdataset shards) are always encoded on the fly.

Numerics: cached ids are the teacher's ids of the same pixels, but computed in other batches;
on some hardware a batch's composition moves a distance by an ulp, which can flip a near-tie
argmin. So cached and on-the-fly runs are not guaranteed bitwise equal; the choice is part of
the stage's config (`train.<stage>.teacher_ids`) and therefore of its identity.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from sftok.data.transforms import hflip
from sftok.storage import DamagedFileError, open_tensors, publish_tensors, rebuilding
from sftok.teacher import FrozenTeacher

CHUNK = 64  # images per teacher forward when building (fixed: the ids must not depend on it)
DIGEST = 16  # bytes of blake2b per image


def pool_key(dataset) -> str | None:
    """The dataset's declared pool identity (`pool_key()`), or None if it is not a pool."""
    fn = getattr(dataset, "pool_key", None)
    return fn() if callable(fn) else None


def image_digest(image: Tensor) -> bytes:
    """Digest of one image's bytes (3×H×W, any dtype; contiguous CPU copy taken if needed)."""
    t = image.detach().to("cpu").contiguous()
    return hashlib.blake2b(t.numpy().tobytes(), digest_size=DIGEST).digest()


class TeacherIdCache:
    """Teacher ids of every image of a pool and of its mirror image, looked up by content."""

    def __init__(self, digests: Tensor, ids: Tensor):
        # digests: P×DIGEST uint8; ids: P×N (int16/int32 storage), row i belongs to digest i.
        self.digests, self.ids = digests, ids
        self.rows = {bytes(d.tolist()): i for i, d in enumerate(digests)}
        self.hits = self.misses = 0  # batches served from the cache / encoded on the fly

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: FrozenTeacher, dataset, device=None) -> TeacherIdCache:
        """Encode every pool image and its mirror (2·len(dataset) rows)."""
        n = len(dataset)
        digests, ids = [], []
        for flip in (False, True):
            for start in range(0, n, CHUNK):
                imgs = [dataset.sample(i)[0] for i in range(start, min(n, start + CHUNK))]
                batch = torch.stack([hflip(x) if flip else x for x in imgs])
                digests += [image_digest(x) for x in batch]
                ids.append(teacher.encode_ids(batch.to(device)).cpu())
        ids = torch.cat(ids)
        small = ids.to(torch.int16 if teacher.codebook_size <= 2 ** 15 else torch.int32)
        return cls(torch.tensor([list(d) for d in digests], dtype=torch.uint8), small)

    @classmethod
    def load_or_build(cls, teacher: FrozenTeacher, dataset, cache_dir: Path | None,
                      teacher_id: str, device=None) -> TeacherIdCache | None:
        """The pool's cache (from `cache_dir/<teacher>-<pool>.safetensors`, built and saved
        when absent; in memory only when cache_dir is None), or None if `dataset` is not a
        pool."""
        key = pool_key(dataset)
        if key is None:
            return None
        name = f"{teacher_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        path = Path(cache_dir) / name if cache_dir is not None else None
        what = "teacher-id cache"
        if path is not None and path.exists():
            try:
                t, _meta = open_tensors(path, what)
            except DamagedFileError as e:  # truncated, altered, or without a digest: rebuild
                rebuilding(e)
            else:
                cache = cls(t["digests"], t["ids"])
                # A stale file (the pool's code changed, not its key) would only miss; rebuild.
                if all(image_digest(dataset.sample(i)[0]) in cache.rows
                       for i in (0, len(dataset) - 1)):
                    return cache
        cache = cls.build(teacher, dataset, device)
        if path is not None:  # atomic, with its digest; concurrent builders write the same bytes
            publish_tensors(path, {"digests": cache.digests, "ids": cache.ids},
                            {"pool": key[:2000], "teacher": teacher_id}, what)
        return cache

    def lookup(self, images: Tensor) -> Tensor | None:
        """ids B×N (long, CPU) of a batch B×3×H×W of pool images, or None if any is unknown."""
        rows = []
        for x in images:
            row = self.rows.get(image_digest(x))
            if row is None:
                self.misses += 1
                return None
            rows.append(row)
        self.hits += 1
        return self.ids[rows].long()
