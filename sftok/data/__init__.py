"""Training and validation data (DESIGN §2): embedded scikit-image photos, image folders,
webdataset shards; the resumable `TrainStream`; `val_batches` for evaluation and
`image_batches` (any stream of batches re-cut to a batch size and an image cap); 8-bit images
and their content hash (`uint8.py`).

Every dataset yields (image float 3×H×W in [0, 1], label int), H = W = `DataConfig.image_size`.
Map-style datasets expose `sample(index, seed)` (training augmentation from `seed`; None = the
deterministic evaluation view) and `skipped` (undecodable files met).
"""
from __future__ import annotations

from pathlib import Path

from sftok.config import ConfigError, DataConfig
from sftok.data.decode import CorruptImageWarning
from sftok.data.embedded import (
    EXTRA_TRAIN_PHOTOS,
    GREY_PHOTOS,
    PHOTOS,
    TRAIN_PHOTOS,
    VAL_PHOTOS,
    EmbeddedPhotos,
)
from sftok.data.folder import ImageFolder
from sftok.data.shards import ShardDataset
from sftok.data.stream import TrainStream, image_batches, val_batches

__all__ = [
    "EXTRA_TRAIN_PHOTOS",
    "PHOTOS",
    "TRAIN_PHOTOS",
    "VAL_PHOTOS",
    "CorruptImageWarning",
    "EmbeddedPhotos",
    "ImageFolder",
    "ShardDataset",
    "TrainStream",
    "build_datasets",
    "build_train_dataset",
    "build_train_view",
    "build_val_dataset",
    "image_batches",
    "val_batches",
]

_HOW = {
    "folder": "an image folder (<root>/<class>/*.JPEG or a flat folder)",
    "webdataset": "webdataset shards (a brace pattern like /data/train-{0000..0255}.tar)",
}


def _train_root(cfg: DataConfig) -> Path:
    root = Path(cfg.path).expanduser()
    if cfg.val_path is not None:
        return root
    # An ImageNet root with train/ and val/ inside: use both, so `imagenet=<root>` is enough.
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root / "train"
    raise ConfigError("data.val_path", f"is required for data.source=folder unless data.path "
                                       f"({str(root)!r}) contains train/ and val/ folders; set "
                                       f"data.val_path to the validation image folder")


class _EmbeddedPool(EmbeddedPhotos):
    """The embedded training split as a finite pool (sftok.train.teacher_ids): its crops are
    drawn once at build time from (photos, size, crops, seed), and `sample` ignores its seed."""

    def pool_key(self) -> str:
        return f"embedded|{','.join(self.photos)}|{self.image_size}|{len(self)}|{self.seed}"


def build_val_dataset(cfg: DataConfig):
    """The validation split alone (never scans training data), with evaluation preprocessing.

    embedded: the held-out photos. folder: `val_path`, else `<path>/val` when it exists, else
    `path` itself (a folder of validation images). webdataset: `val_path`, else `path`.
    """
    if cfg.source == "embedded":
        return EmbeddedPhotos(VAL_PHOTOS, cfg.image_size, cfg.val_crops_per_image, cfg.seed)
    if cfg.source not in _HOW:
        raise ConfigError("data.source", f"unknown source {cfg.source!r}")
    if cfg.path is None and cfg.val_path is None:
        raise ConfigError("data.path", f"is required for data.source={cfg.source}: "
                                       f"set it to {_HOW[cfg.source]}")
    field = "data.val_path" if cfg.val_path is not None else "data.path"
    if cfg.source == "webdataset":
        return ShardDataset(cfg.val_path or cfg.path, cfg.image_size, train=False, field=field)
    root = Path(cfg.val_path or cfg.path).expanduser()
    if cfg.val_path is None and (root / "val").is_dir():
        root = root / "val"
    return ImageFolder(root, cfg.image_size, train=False, field=field)


def build_train_view(cfg: DataConfig):
    """Training images as evaluation sees them (no augmentation), to measure the gap between
    training and held-out reconstruction (the teacher's learning curve).

    embedded: fixed crops of the colour training photos, `val_crops_per_image` each, so the gap
    compares the held-out colour photos with their like: no procedural images, and no
    greyscale photos or textures, which are easier to reconstruct (measured on the tiny
    teacher at step 10500: 27.9 dB on the greyscale ones, 24.7 on the 7 colour training photos,
    25.1 held-out). folder: the training folder's centre crops. webdataset: the training
    shards' evaluation view. Cap it with `val_batches`.
    """
    if cfg.source == "embedded":
        photos = TRAIN_PHOTOS + (EXTRA_TRAIN_PHOTOS if cfg.extra_photos else ())
        colour = tuple(p for p in photos if p not in GREY_PHOTOS)
        return EmbeddedPhotos(colour, cfg.image_size, cfg.val_crops_per_image, cfg.seed)
    train = build_train_dataset(cfg)
    if cfg.source == "folder":
        return ImageFolder(train.root, cfg.image_size, train=False, field="data.path")
    return ShardDataset(cfg.path, cfg.image_size, train=False, field="data.path")


def build_train_dataset(cfg: DataConfig):
    """The training split alone (with training augmentation); errors name the field to fix."""
    if cfg.source == "embedded":
        photos = TRAIN_PHOTOS + (EXTRA_TRAIN_PHOTOS if cfg.extra_photos else ())
        # Fixed crops and no procedural images: a finite pool (teacher ids computed once).
        pool = not cfg.fresh_crops and not cfg.dead_leaves
        return (_EmbeddedPool if pool else EmbeddedPhotos)(
            photos, cfg.image_size, cfg.train_crops_per_image, cfg.seed,
            fresh=cfg.fresh_crops, dead_leaves=cfg.dead_leaves)
    if cfg.source not in _HOW:
        raise ConfigError("data.source", f"unknown source {cfg.source!r}")
    if cfg.path is None:
        raise ConfigError("data.path", f"is required for data.source={cfg.source}: "
                                       f"set it to {_HOW[cfg.source]}")
    if cfg.source == "folder":
        # Training needs its own split: an explicit val_path, or train/ and val/ under path.
        # train_crop=center: centre crops only (a finite pool, teacher ids cached).
        return ImageFolder(_train_root(cfg), cfg.image_size, train=True, field="data.path",
                           crop=cfg.train_crop)
    if cfg.val_path is None:
        raise ConfigError("data.val_path", "is required for data.source=webdataset: set it "
                                           "to the validation shards (a brace pattern)")
    return ShardDataset(cfg.path, cfg.image_size, train=True, seed=cfg.seed)


def build_datasets(cfg: DataConfig):
    """(train, val) datasets for `cfg.source`: `build_train_dataset`, `build_val_dataset`.

    embedded: `EmbeddedPhotos` over TRAIN_PHOTOS (+ EXTRA_TRAIN_PHOTOS with cfg.extra_photos;
    fresh crops with cfg.fresh_crops; + cfg.dead_leaves procedural images) / VAL_PHOTOS with
    cfg.train_crops_per_image / cfg.val_crops_per_image crops each, seeded by cfg.seed. folder: `ImageFolder` (train with
    random crops, val with centre crops). webdataset: `ShardDataset` over cfg.path / cfg.val_path.
    """
    return build_train_dataset(cfg), build_val_dataset(cfg)
