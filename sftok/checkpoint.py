"""Model checkpoints: a directory with `model.safetensors` + `config.json` (DESIGN §2).

`config.json` is exactly `to_dict(cfg)` of the resolved config (an ExperimentConfig for a trial;
a TokenizerConfig or TeacherConfig also works), so other tools can read it with `from_dict`.
What to rebuild (module class, V, grid, teacher shape) is stored in the safetensors header
metadata. Never pickle: tensors go through safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sftok.config import (
    ExperimentConfig,
    GeneratorModelConfig,
    TeacherConfig,
    TokenizerConfig,
    from_dict,
    to_dict,
)
from sftok.generation.model import MaskGITGenerator
from sftok.teacher import FrozenTeacher, MaskGitVQGAN, check_state_dict
from sftok.tokenizer import SFTok
from sftok.weights import WeightsFileError, read_safetensors

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = "sftok-lab/1"
_CONFIG_TYPES = {c.__name__: c for c in (ExperimentConfig, TokenizerConfig, TeacherConfig)}


def save_model(path: str | Path, module: nn.Module, cfg: Any) -> Path:
    """Write `module` (SFTok, MaskGitVQGAN, FrozenTeacher or MaskGITGenerator) and its config under directory `path`.

    For a FrozenTeacher the inner MaskGitVQGAN's weights are written (official key layout).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if type(cfg).__name__ not in _CONFIG_TYPES:
        raise TypeError(f"cfg must be one of {', '.join(_CONFIG_TYPES)}, got {type(cfg).__name__}")
    meta = {"format": FORMAT, "module": type(module).__name__, "config_type": type(cfg).__name__}
    if isinstance(module, SFTok):
        meta.update(num_codes=str(module.num_codes), grid=str(module.grid),
                    tokenizer=json.dumps(to_dict(module.cfg)),
                    teacher=json.dumps(to_dict(module.teacher_cfg)) if module.teacher_cfg else "")
        weights = module.state_dict()
    elif isinstance(module, FrozenTeacher):
        meta.update(teacher=json.dumps(to_dict(module.model.cfg)),
                    image_size=str(module.image_size))
        weights = module.model.state_dict()
    elif isinstance(module, MaskGitVQGAN):
        meta.update(teacher=json.dumps(to_dict(module.cfg)))
        weights = module.state_dict()
    elif isinstance(module, MaskGITGenerator):
        meta.update(generator=json.dumps(to_dict(module.cfg)), num_codes=str(module.num_codes),
                    num_tokens=str(module.num_tokens), num_classes=str(module.num_classes))
        weights = module.state_dict()
    else:
        raise TypeError(f"save_model: unsupported module {type(module).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
    tmp = path / (WEIGHTS + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path / WEIGHTS)  # atomic: a crash never leaves a half-written checkpoint
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial file
    (path / CONFIG).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Read a directory written by `save_model` -> (module, cfg). Strict key/shape check.

    The module comes back as built by its constructor (training mode for SFTok / MaskGitVQGAN;
    call `.eval()` for inference); a saved FrozenTeacher comes back frozen.
    """
    path = Path(path)
    wfile, cfile = path / WEIGHTS, path / CONFIG
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path} (a directory written "
                                f"by training: .../<stage>/final with {WEIGHTS} + {CONFIG})")
    for f in (wfile, cfile):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {f} (a checkpoint directory "
                                    f"holds {WEIGHTS} + {CONFIG}; point at .../<stage>/final)")
    meta = read_safetensors(wfile, metadata_only=True)
    if meta.get("format") != FORMAT or meta.get("config_type") not in _CONFIG_TYPES:
        raise WeightsFileError(f"{wfile}: not an sftok-lab checkpoint (metadata {meta}); an "
                               "official SFTok file needs --official")
    try:
        saved = json.loads(cfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsFileError(f"{cfile}: not valid JSON ({e}); restore it from the run's "
                               "artifacts (checkpoint/config.json)") from None
    cfg = from_dict(_CONFIG_TYPES[meta["config_type"]], saved)
    kind = meta["module"]
    if kind == "SFTok":
        tok = from_dict(TokenizerConfig, json.loads(meta["tokenizer"]))
        teacher = from_dict(TeacherConfig, json.loads(meta["teacher"])) if meta["teacher"] else None
        num_codes, grid = int(meta["num_codes"]), int(meta["grid"])
        # The module is rebuilt from the metadata (what was actually saved); config.json is
        # the trial's resolved config, which a stage may have specialised (e.g. stage 3 turns
        # on finetune_decoder).
        module: nn.Module = SFTok(tok, num_codes, grid, teacher)
    elif kind in ("MaskGitVQGAN", "FrozenTeacher"):
        module = MaskGitVQGAN(from_dict(TeacherConfig, json.loads(meta["teacher"])))
    elif kind == "MaskGITGenerator":
        module = MaskGITGenerator(from_dict(GeneratorModelConfig, json.loads(meta["generator"])),
                                  int(meta["num_codes"]), int(meta["num_tokens"]),
                                  int(meta["num_classes"]))
    else:
        raise ValueError(f"{wfile}: unknown module type {kind!r}")
    sd = read_safetensors(wfile)
    check_state_dict(module, sd, f"checkpoint {wfile}")
    module.load_state_dict(sd, strict=True)
    module.to(device)
    if kind == "FrozenTeacher":
        module = FrozenTeacher(module, int(meta["image_size"]))
    return module, cfg
