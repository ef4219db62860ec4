"""Embedded data that generalises (issue 9): fresh crops, extra photos, dead leaves.

Determinism across calls and processes, train/validation disjointness, exact resume.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import check_resume_exact

from sftok.config import ConfigError, DataConfig, override
from sftok.data import (
    EXTRA_TRAIN_PHOTOS,
    PHOTOS,
    TRAIN_PHOTOS,
    VAL_PHOTOS,
    EmbeddedPhotos,
    TrainStream,
    build_train_dataset,
    build_val_dataset,
)
from sftok.data.dead_leaves import dead_leaves
from sftok.data.embedded import DEAD_LEAVES_LABEL, load_photo
from sftok.data.seeding import generator
from sftok.presets import get_preset

SIZE = 16
CFG = DataConfig(image_size=SIZE, train_crops_per_image=2, val_crops_per_image=2,
                 fresh_crops=True, extra_photos=True, dead_leaves=0.25, seed=5)

# Run in a fresh interpreter: the same config must give the same bytes in another process.
_DIGEST = """
import hashlib, torch
from sftok.config import DataConfig
from sftok.data import build_train_dataset
ds = build_train_dataset(DataConfig(image_size=16, train_crops_per_image=2,
                                    val_crops_per_image=2, fresh_crops=True,
                                    extra_photos=True, dead_leaves=0.25, seed=5))
idx = [0, 7, 21, len(ds) - 1]
x = torch.stack([ds.sample(i, 1000 + i)[0] for i in idx] + [ds[i][0] for i in idx])
print(hashlib.sha256(x.numpy().tobytes()).hexdigest())
"""


def _digest(ds) -> str:
    idx = [0, 7, 21, len(ds) - 1]
    x = torch.stack([ds.sample(i, 1000 + i)[0] for i in idx] + [ds[i][0] for i in idx])
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()


def test_fresh_data_deterministic_across_calls_and_processes():
    ds = build_train_dataset(CFG)
    assert _digest(ds) == _digest(build_train_dataset(CFG))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True,
                         env=env, check=True, cwd=root)
    assert out.stdout.strip() == _digest(ds)


def test_fresh_crops_change_with_the_sample_seed_only():
    ds = build_train_dataset(CFG)
    a, la = ds.sample(3, seed=11)
    b, lb = ds.sample(3, seed=12)
    assert la == lb == PHOTOS.index(ds.photos[3 // CFG.train_crops_per_image])
    assert not torch.equal(a, b)  # a new crop for every draw: no fixed pool
    assert torch.equal(a, ds.sample(3, seed=11)[0])
    assert a.shape == (3, SIZE, SIZE) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_dead_leaves_share_and_label():
    ds = build_train_dataset(CFG)
    photos = len(TRAIN_PHOTOS + EXTRA_TRAIN_PHOTOS) * CFG.train_crops_per_image
    assert ds.num_photo_samples == photos
    assert len(ds) == photos + round(0.25 / 0.75 * photos)
    assert (ds.labels[photos:] == DEAD_LEAVES_LABEL).all()
    assert (ds.labels[:photos] >= 0).all()
    image, label = ds.sample(len(ds) - 1, seed=3)
    assert label == DEAD_LEAVES_LABEL and image.shape == (3, SIZE, SIZE)


def test_dead_leaves_pure_function_of_generator_and_uses_pool_colours():
    pool = torch.tensor([[0, 0, 0], [255, 255, 255]], dtype=torch.uint8)
    a = dead_leaves(SIZE, pool, generator(1))
    assert torch.equal(a, dead_leaves(SIZE, pool, generator(1)))
    assert not torch.equal(a, dead_leaves(SIZE, pool, generator(2)))
    # grey only where an antialiased edge mixes the two pool colours; all channels equal
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])


def test_train_and_val_photos_disjoint_by_name_and_pixels():
    train = set(TRAIN_PHOTOS) | set(EXTRA_TRAIN_PHOTOS)
    assert not train & set(VAL_PHOTOS)
    assert train | set(VAL_PHOTOS) == set(PHOTOS)
    # no training photo is the same picture as a held-out one under another name (an alias,
    # or the other view of a stereo pair would need the same check)
    for v in VAL_PHOTOS:
        val = load_photo(v)
        for t in train:
            pic = load_photo(t)
            assert pic.shape != val.shape or not np.array_equal(pic, val), (t, v)
    ds, val_ds = build_train_dataset(CFG), build_val_dataset(CFG)
    val_labels = {PHOTOS.index(p) for p in VAL_PHOTOS}
    assert not set(ds.labels.tolist()) & val_labels
    assert set(val_ds.labels.tolist()) == val_labels


def test_validation_is_the_fixed_held_out_pool_whatever_the_training_regime():
    plain = build_val_dataset(DataConfig(image_size=SIZE, val_crops_per_image=2, seed=5))
    assert torch.equal(build_val_dataset(CFG).images, plain.images)


def test_stream_resume_exact_with_fresh_crops():
    ds = EmbeddedPhotos(TRAIN_PHOTOS, SIZE, 2, seed=0, fresh=True, dead_leaves=0.2)
    check_resume_exact(ds, 3, seed=3)
    # epoch 2 draws other crops of the same photos than epoch 1
    stream = TrainStream(ds, batch_size=len(ds), seed=3, flip=False)
    (x1, l1), (x2, l2) = next(stream), next(stream)
    assert sorted(l1.tolist()) == sorted(l2.tolist())
    assert not torch.equal(x1[l1.argsort(stable=True)], x2[l2.argsort(stable=True)])


def test_bad_dead_leaves_fraction_is_a_config_error():
    with pytest.raises(ConfigError, match="data.dead_leaves"):
        override(get_preset("smoke"), {"data.dead_leaves": 1.0})
    with pytest.raises(ValueError, match="dead_leaves"):
        EmbeddedPhotos(TRAIN_PHOTOS, SIZE, 1, dead_leaves=-0.1)
