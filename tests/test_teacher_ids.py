"""Teacher ids computed once for a finite pool of training images (issue 10, sftok.train.teacher_ids):
which datasets are pools, the cache's rows match the teacher's ids of the stream's (flipped)
images, misses fall back, the disk copy is reused (and rebuilt when stale), and stages 1-2 use
it."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sftok.config import DataConfig, override
from sftok.data import TrainStream, build_train_dataset
from sftok.presets import get_preset
from sftok.train import stages as stages_mod
from sftok.train.teacher_ids import TeacherIdCache, pool_key


class Pool(torch.utils.data.Dataset):
    """A finite pool of random images (declares itself one)."""

    def __init__(self, n=10, size=16, seed=0, key="pool-a"):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.key = key

    def __len__(self):
        return len(self.images)

    def sample(self, i, seed=None):
        return self.images[i].clone(), 0

    def pool_key(self):
        return self.key


def test_cache_rows_are_the_teachers_ids_of_stream_images(smoke_teacher):
    pool = Pool(n=70)  # more than one build chunk
    cache = TeacherIdCache.load_or_build(smoke_teacher, pool, None, "t")
    assert len(cache) == 140 and cache.ids.shape == (140, smoke_teacher.grid ** 2)
    stream = TrainStream(pool, 8, seed=1)  # random order and flips
    agree = total = 0
    for _ in range(12):
        images, _ = next(stream)
        ids = cache.lookup(images)
        assert ids is not None and ids.dtype == torch.long
        agree += int((ids == smoke_teacher.encode_ids(images)).sum())
        total += ids.numel()
    # Same pixels, but encoded in other batches: an ulp can flip a near-tie argmin, so not
    # exact by contract; a wrong row would agree on ~1/V of the positions.
    assert agree / total > 0.99
    assert (cache.hits, cache.misses) == (12, 0)


def test_unknown_images_miss_and_non_pools_get_no_cache(smoke_teacher):
    cache = TeacherIdCache.load_or_build(smoke_teacher, Pool(n=4), None, "t")
    foreign = torch.stack([Pool(n=4).images[0], Pool(n=1, seed=5).images[0]])
    assert cache.lookup(foreign) is None and cache.misses == 1
    assert TeacherIdCache.load_or_build(smoke_teacher, Pool(n=4, key=None), None, "t") is None


def test_disk_cache_is_reused_and_a_stale_one_rebuilt(smoke_teacher, tmp_path, monkeypatch):
    first = TeacherIdCache.load_or_build(smoke_teacher, Pool(n=6), tmp_path, "t")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("t-")
    built = []
    real = TeacherIdCache.build.__func__
    monkeypatch.setattr(TeacherIdCache, "build",
                        classmethod(lambda cls, *a, **k: built.append(1) or real(cls, *a, **k)))
    again = TeacherIdCache.load_or_build(smoke_teacher, Pool(n=6), tmp_path, "t")
    assert not built and torch.equal(again.ids, first.ids)
    # Same key, other pixels (the pool's code changed): the file is rebuilt, not trusted.
    TeacherIdCache.load_or_build(smoke_teacher, Pool(n=6, seed=9), tmp_path, "t")
    assert built == [1]


def test_which_datasets_are_pools(tmp_path):
    emb = build_train_dataset(DataConfig(image_size=16, train_crops_per_image=2))
    assert pool_key(emb) and pool_key(emb) != pool_key(
        build_train_dataset(DataConfig(image_size=16, train_crops_per_image=2, seed=1)))
    for split in ("train/a", "val/a"):
        (tmp_path / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tmp_path / split / f"{i}.png")
    folder = DataConfig(source="folder", path=str(tmp_path), image_size=16)
    assert pool_key(build_train_dataset(folder)) is None  # random crops: encoded on the fly
    center = build_train_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=16,
                                            train_crop="center"))
    assert pool_key(center) and center.sample(0, 123)[0].equal(center.sample(0, 7)[0])


def test_token_stage_looks_ids_up(smoke_teacher, tmp_path, monkeypatch):
    cfg = override(get_preset("smoke"), {"train.stage1.steps": 2})
    seen = []
    real = TeacherIdCache.lookup
    monkeypatch.setattr(TeacherIdCache, "lookup",
                        lambda self, x: seen.append(real(self, x) is not None) or real(self, x))
    stages_mod.train_stage(cfg, "stage1", smoke_teacher, tmp_path / "cached", id_cache_dir=tmp_path)
    assert seen == [True, True] and any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    seen.clear()
    stages_mod.train_stage(override(cfg, {"train.stage1.teacher_ids": "encode"}), "stage1",
                           smoke_teacher, tmp_path / "encoded")
    assert seen == []
