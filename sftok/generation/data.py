"""Which images the generation stage reads: training tokens' source, FID reference, held-out.

- training images (tokenised, and the default FID reference statistics): the training split in
  its deterministic view (centre crops), as the released recipe tokenises them;
- held-out images (the `calib_fid_heldout` row): real images of the *same classes* not used for
  training. Image folders / shards: the validation split (ImageNet val has the train classes).
  Embedded photos: the validation photos are other photos (other classes), so held-out images
  are fresh crops of the training photos drawn with another seed.
"""
from __future__ import annotations

from sftok.config import DataConfig
from sftok.data import TRAIN_PHOTOS, EmbeddedPhotos, build_val_dataset


def train_data_key(d: DataConfig) -> str:
    """Key of the training images (token cache, FID reference statistics cache)."""
    return f"train-{d.source}-{d.path or 'embedded'}-{d.image_size}-{d.train_crops_per_image}-{d.seed}"


def heldout_dataset(d: DataConfig):
    """Real held-out images of the training classes (see the module docstring)."""
    if d.source == "embedded":
        return EmbeddedPhotos(TRAIN_PHOTOS, d.image_size, d.val_crops_per_image, d.seed + 1)
    return build_val_dataset(d)


def class_names(d: DataConfig, dataset) -> dict[int, str]:
    """Class index -> name for labelling sample grids: the photo of an embedded crop, the
    folder name of an image folder; {} when the data names no classes."""
    if d.source == "embedded":
        from sftok.data import PHOTOS

        return dict(enumerate(PHOTOS))
    names = getattr(dataset, "classes", None)
    return dict(enumerate(names)) if names else {}
