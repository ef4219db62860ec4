"""Teachers shipped with the library (issue 20): trained once, loaded like a released file.

The paper never trains its teacher: it loads the released MaskGIT-VQGAN. Small presets have no
released teacher to load, so the project trains one once (stage 0, `scripts/train_teacher.py`)
and ships it here as package data, two files per teacher NAME:

- `NAME.safetensors`: the weights in the official key layout (`sftok.teacher`);
- `NAME.json`, the manifest: `sha256` (of the weights file) and `bytes`, `teacher` (the
  architecture: the `TeacherConfig` fields that shape the weights), `image_size`, `data` and
  `train` (the data and stage-0 configs it was trained with), `cache_key` (what
  `teacher.source: train` would cache it under), `command` (the exact command that trained it),
  `curve` (its held-out learning curve), `val_psnr`, `floor_teacher_psnr` (the naive codec with
  its bits on the same held-out images), `steps`, `train_time_s`, `commit`.

A config selects one with `teacher.source: shipped` and `teacher.shipped: NAME` (`tiny` does).
Loading checks, each failing with one line (`ShippedTeacherError`): the name exists, the weights
file's sha256 is the manifest's (and `teacher.sha256`, when the config pins it), and the config's
architecture and image size are the manifest's. The sha256 identifies the teacher everywhere a
cache or stage key needs it (`sftok.train.teacher_stage.teacher_identity`).

`sftok.released.ship.ship_teacher` writes the two files from a finished stage-0 directory.
The files are found with `importlib.resources`, so an editable install and a built wheel both
work (`pyproject.toml` lists them as package data).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from sftok.config import TeacherConfig, to_dict

# The TeacherConfig fields that shape the weights (the rest say where they come from).
ARCHITECTURE = ("hidden_channels", "channel_mult", "num_res_blocks", "z_channels",
                "codebook_size")
WEIGHTS_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"


class ShippedTeacherError(ValueError):
    """A shipped teacher is unknown, damaged, or does not fit the config that asks for it."""


@dataclass(frozen=True)
class ShippedTeacher:
    name: str
    manifest: dict[str, Any]
    weights: bytes  # the safetensors file, read once (hashed and loaded from the same bytes)

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]


def _root():
    """Where the shipped files are: this package's data (a Traversable)."""
    return resources.files(__name__)


def shipped_names() -> list[str]:
    """Names of the teachers shipped in this installation."""
    return sorted(p.name[: -len(MANIFEST_SUFFIX)] for p in _root().iterdir()
                  if p.name.endswith(MANIFEST_SUFFIX))


def _files(name: str):
    root = _root()
    return root / f"{name}{MANIFEST_SUFFIX}", root / f"{name}{WEIGHTS_SUFFIX}"


def read_manifest(name: str) -> dict[str, Any]:
    manifest, _ = _files(name)
    if not manifest.is_file():
        known = ", ".join(shipped_names()) or "none"
        raise ShippedTeacherError(
            f"teacher.shipped={name!r}: no such shipped teacher (shipped: {known}); name one of "
            f"them, or train one with --set teacher.source=train")
    return json.loads(manifest.read_text())


def load_shipped(tcfg: TeacherConfig, image_size: int) -> ShippedTeacher:
    """The shipped teacher `tcfg.shipped`, checked against its manifest and against `tcfg`."""
    if not tcfg.shipped:
        raise ShippedTeacherError("teacher.source=shipped needs teacher.shipped=NAME "
                                  f"(shipped: {', '.join(shipped_names()) or 'none'})")
    name = tcfg.shipped
    manifest = read_manifest(name)
    check_fits(manifest, tcfg, image_size)
    _, weights_file = _files(name)
    if not weights_file.is_file():
        raise ShippedTeacherError(
            f"shipped teacher {name!r}: its weights file {name}{WEIGHTS_SUFFIX} is missing from "
            f"the installed package; reinstall sftok (or `git checkout sftok/released/`)")
    data = weights_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise ShippedTeacherError(
            f"shipped teacher {name!r}: {name}{WEIGHTS_SUFFIX} has sha256 {digest[:16]}… but its "
            f"manifest says {manifest['sha256'][:16]}…: the file is damaged or was replaced; "
            f"reinstall sftok (or `git checkout sftok/released/`)")
    if tcfg.sha256 is not None and tcfg.sha256 != digest:
        raise ShippedTeacherError(
            f"teacher.sha256={tcfg.sha256[:16]}… but the shipped teacher {name!r} is "
            f"{digest[:16]}…: this installation ships another teacher than the config was made "
            f"for; install the matching sftok, or drop teacher.sha256 to accept this one")
    return ShippedTeacher(name, manifest, data)


def check_fits(manifest: dict[str, Any], tcfg: TeacherConfig, image_size: int) -> None:
    """One line naming the first field where the config differs from the shipped teacher."""
    name = manifest["name"]
    want = to_dict(tcfg)
    for key in ARCHITECTURE:
        have = manifest["teacher"][key]
        mine = list(want[key]) if isinstance(want[key], (tuple, list)) else want[key]
        if mine != have:
            raise ShippedTeacherError(
                f"teacher.{key}={mine} does not match the shipped teacher {name!r} ({have}); "
                f"drop that override to use it, or train a teacher for this config with --set "
                f"teacher.source=train")
    if image_size != manifest["image_size"]:
        raise ShippedTeacherError(
            f"tokenizer.image_size={image_size}, but the shipped teacher {name!r} was trained "
            f"on {manifest['image_size']}x{manifest['image_size']} images; use that size, or "
            f"train a teacher for this one with --set teacher.source=train")


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = [
    "ARCHITECTURE",
    "ShippedTeacher",
    "ShippedTeacherError",
    "check_fits",
    "content_hash",
    "load_shipped",
    "read_manifest",
    "shipped_names",
]
