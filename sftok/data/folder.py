"""An image folder: ImageNet layout root/<class>/*.JPEG (labels = sorted class folders) or a flat
folder of images (label 0), with the paper's preprocessing (`transforms.py`).

A file that cannot be decoded is skipped, counted in `skipped`, and reported once (`decode.py`).
Training view: in its place the dataset returns the next decodable file in index order, so the
substitution is deterministic and a resumed run sees the same images. Evaluation view: the item
is None, and `val_batches` leaves it out and counts it, so no image is scored twice.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sftok.config import ConfigError
from sftok.data.decode import DECODE_ERRORS, SkipLog, load_rgb
from sftok.data.seeding import generator
from sftok.data.transforms import eval_transform, train_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _images_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan_folder(root: str | Path, field: str = "data.path") -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of `root`; raises ConfigError naming `field` if unusable.

    Class layout if any sub-folder holds images (files directly in root are then ignored, as in
    torchvision's ImageFolder); otherwise a flat folder whose images all get label 0.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(field, f"image folder {str(root)!r} does not exist (or is not a "
                                 f"directory); point {field} at an ImageNet-style root "
                                 f"(<root>/<class>/*.JPEG) or a flat folder of images")
    per_class = {d.name: found for d in sorted(root.iterdir())
                 if d.is_dir() and (found := _images_under(d))}
    classes = sorted(per_class)
    if classes:
        files, labels = [], []
        for label, name in enumerate(classes):
            files += per_class[name]
            labels += [label] * len(per_class[name])
    else:
        files = sorted(p for p in root.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        labels, classes = [0] * len(files), [root.name]
    if not files:
        raise ConfigError(field, f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(root)!r}; "
                                 f"expected <root>/<class>/*.JPEG or a flat folder of images")
    return files, labels, classes


class ImageFolder(Dataset):
    """Map-style dataset of (image float 3×size×size in [0, 1], label int).

    `sample(i, seed)`: with `train=True` and a seed, a random crop drawn from that seed (the
    horizontal flip is added by `TrainStream`); otherwise the deterministic centre crop.
    `crop="center"` makes the training view use the centre crop too (a finite pool).
    `__getitem__(i)` is `sample(i)`: the evaluation view.
    """

    def __init__(self, root: str | Path, image_size: int, train: bool = False,
                 field: str = "data.path", crop: str = "random"):
        self.root = Path(root).expanduser()
        self.files, self.labels, self.classes = scan_folder(self.root, field)
        self.image_size = image_size
        self.train = train
        self.crop = crop
        self.skip_log = SkipLog(f"{field} {str(self.root)!r}",
                                "training goes on with the next decodable file" if train else
                                "it is left out: only decodable images are evaluated")
        self._bad: set[int] = set()

    @property
    def skipped(self) -> int:
        """Undecodable files met so far (in this process)."""
        return self.skip_log.count

    def __len__(self) -> int:
        return len(self.files)

    def pool_key(self) -> str | None:
        """A finite pool (sftok.train.teacher_ids) of the training view with `crop="center"`:
        the files (paths, sizes, mtimes) and the size identify its images. None otherwise
        (random crops; the evaluation view, which drops undecodable files)."""
        if not self.train or self.crop != "center":
            return None
        h = hashlib.sha256(f"folder|{self.image_size}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return f"folder-{h.hexdigest()}"

    def sample(self, index: int, seed: int | None = None) -> tuple[torch.Tensor, int] | None:
        """(image, label); an undecodable file: the next decodable one (training view), None
        (evaluation view: the caller drops it, see `val_batches`)."""
        n = len(self.files)
        if not self.train:
            try:
                img = load_rgb(self.files[index])
            except DECODE_ERRORS as e:
                self.skip_log.record(str(self.files[index]), e)
                return None
            return eval_transform(img, self.image_size), self.labels[index]
        for step in range(n):
            i = (index + step) % n  # deterministic substitute for a bad file: the next good one
            if i in self._bad:
                continue
            try:
                img = load_rgb(self.files[i])
            except DECODE_ERRORS as e:
                self._bad.add(i)
                self.skip_log.record(str(self.files[i]), e)
                continue
            if seed is not None and self.crop == "random":
                image = train_transform(img, self.image_size, generator(seed))
            else:
                image = eval_transform(img, self.image_size)
            return image, self.labels[i]
        raise RuntimeError(f"none of the {n} images in {str(self.root)!r} can be decoded")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        return self.sample(index)
