"""Shipping a trained teacher into the package (`scripts/train_teacher.py --ship NAME`): the
weights file and its manifest (fields: `sftok.released`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from sftok.config import to_dict
from sftok.data import build_val_dataset, val_batches
from sftok.data.uint8 import to_uint8
from sftok.evaluate.bounds import floor_codecs
from sftok.evaluate.metrics import psnr
from sftok.released import ARCHITECTURE, MANIFEST_SUFFIX, WEIGHTS_SUFFIX, content_hash
from sftok.teacher import FrozenTeacher
from sftok.train.teacher_stage import WEIGHTS_FILE, teacher_cache_key, teacher_info


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def ship_teacher(entry: str | os.PathLike, name: str, cfg, command: str,
                 extra: dict[str, Any] | None = None, dest: str | os.PathLike | None = None
                 ) -> Path:
    """Copy the finished stage-0 teacher in `entry` (`train_teacher`'s directory, with its
    `teacher.json`) into the package as `name` and write its manifest; returns the manifest.

    `cfg` is the resolved config it was trained with, `command` the command that trained it,
    `extra` more manifest fields (e.g. `floor_teacher_psnr`). `dest`: another folder than the
    package's (tests).
    """
    entry = Path(entry)
    record = teacher_info(entry)
    dest = Path(dest) if dest is not None else Path(__file__).parent
    weights = dest / f"{name}{WEIGHTS_SUFFIX}"
    tmp = weights.with_name(f".tmp-{os.getpid()}-{weights.name}")
    shutil.copyfile(entry / WEIGHTS_FILE, tmp)
    teacher = to_dict(cfg.teacher)
    data = to_dict(cfg.data)
    data.pop("num_workers", None)
    train = to_dict(cfg.train.teacher)
    manifest = {
        "name": name,
        "sha256": content_hash(tmp),
        "bytes": tmp.stat().st_size,
        "teacher": {k: teacher[k] for k in ARCHITECTURE},
        "image_size": cfg.tokenizer.image_size,
        "data": data,
        "train": train,
        "cache_key": teacher_cache_key(cfg),
        "command": command,
        "steps": record["steps"],
        "train_time_s": record["train_time_s"],
        "val_psnr": record["val_psnr"],
        "val_code_usage": record["val_code_usage"],
        "curve": record.get("curve", []),
        "commit": _commit(),
        **(extra or {}),
    }
    os.replace(tmp, weights)
    path = dest / f"{name}{MANIFEST_SUFFIX}"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


@torch.no_grad()
def heldout_bounds(cfg, teacher: FrozenTeacher, cache_dir: str | os.PathLike | None = None
                   ) -> dict[str, float]:
    """The teacher's held-out PSNR as every evaluation scores it (8-bit images,
    `teacher_psnr`), beside the naive codecs with its bits (`floor_teacher_psnr`) and with
    the tokenizer's (`floor_tokenizer_psnr`) on the same images (`sftok.evaluate.bounds`)."""
    floors = floor_codecs(cfg, cache_dir)
    sums = {"teacher_psnr": 0.0, "floor_teacher_psnr": 0.0, "floor_tokenizer_psnr": 0.0}
    n = 0
    device = next(teacher.parameters()).device
    for images in val_batches(build_val_dataset(cfg.data), 64):
        x_u8 = to_uint8(images.to(device))
        x = x_u8.float() / 255
        recons = {"teacher_psnr": teacher.decode_ids(teacher.encode_ids(x)),
                  "floor_teacher_psnr": floors["teacher"].reconstruct(x),
                  "floor_tokenizer_psnr": floors["tokenizer"].reconstruct(x)}
        for k, rec in recons.items():
            sums[k] += float(psnr(to_uint8(rec), x_u8).sum())
        n += x.shape[0]
    return {k: v / n for k, v in sums.items()}
