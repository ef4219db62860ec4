"""What every tokenizer stage starts from: its seed, a fresh tokenizer, the previous result.

Shared by the token stages (`stages.TokenTask`, stages 1-2) and the pixel stage
(`stage3.PixelTask`), which `stages.py` builds; so both depend on this module, not on each other.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from sftok.config import ExperimentConfig
from sftok.teacher import FrozenTeacher
from sftok.tokenizer import SFTok

STAGES = ("stage1", "stage2", "stage3")


def stage_seed(cfg: ExperimentConfig, stage: str) -> int:
    """Per-trial, per-stage seed: stages draw independent masks / data orders."""
    return cfg.seed * 1000 + (STAGES.index(stage) + 1) * 10


def build_tokenizer(cfg: ExperimentConfig, teacher: FrozenTeacher) -> SFTok:
    return SFTok(cfg.tokenizer, num_codes=teacher.codebook_size, grid=teacher.grid,
                 teacher_cfg=cfg.teacher)


def load_init(model: nn.Module, init: Path, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Load init/model.safetensors into `model`; only keys starting with `allow_missing` may be
    absent (stage 3 starting from a stage-2 tokenizer has no pixel path yet). Returns them."""
    path = Path(init) / "model.safetensors" if Path(init).is_dir() else Path(init)
    sd = load_file(str(path))
    result = model.load_state_dict(sd, strict=False)
    bad_missing = [k for k in result.missing_keys if not k.startswith(allow_missing)]
    if bad_missing or result.unexpected_keys:
        raise ValueError(f"init checkpoint {path} does not match the model: missing "
                         f"{bad_missing[:6]}, unexpected {result.unexpected_keys[:6]}")
    return list(result.missing_keys)
