"""Atomic, resumable training checkpoints (DESIGN §2 'Checkpoints'; issue 3 'exact resume').

Layout of one periodic checkpoint `out_dir/step_00000200/`:
  <name>.safetensors   one file per module state (model, ema, discriminator, ...)
  state.pt             optimiser + grad-scaler states, torch RNG states (CPU, CUDA, the
                       training generator), data-stream state; read with weights_only=True
  state.json           step, python RNG state, metrics so far, the resolved config; written
                       last, so a directory without it is never taken as a checkpoint

Every checkpoint is written into a hidden temporary directory and renamed into place, so a crash
mid-write never leaves a half checkpoint; only the newest `keep` are kept. The LR schedule is a
pure function of the step (optim.lr_at), so the step *is* the scheduler state.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

PREFIX = "step_"
FINAL = "final"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """safetensors file of a state dict; tensors that share storage are cloned apart."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()
        seen.add(key)
        out[k] = v
    save_file(out, str(path))


def python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(state: list) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


def torch_rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_torch_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_dir(out_dir: Path, name: str) -> tuple[Path, Path]:
    """(temporary dir to write into, final path); call `commit_dir` when done."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp, out_dir / name


def commit_dir(tmp: Path, final: Path) -> Path:
    """Rename the finished temporary directory into place (replacing an older one)."""
    for f in tmp.iterdir():
        _fsync_file(f)
    if final.exists():
        # Only reachable when re-writing the same step (a fresh, non-resumed run over old files).
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def save_checkpoint(out_dir: Path, step: int, tensors: dict[str, dict[str, Tensor]],
                    torch_state: dict[str, Any], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write `out_dir/step_{step:08d}` atomically and prune to the newest `keep` checkpoints."""
    tmp, final = atomic_dir(out_dir, f"{PREFIX}{step:08d}")
    for name, sd in tensors.items():
        save_tensors(tmp / f"{name}.safetensors", sd)
    torch.save(torch_state, tmp / "state.pt")
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step}, indent=1, default=str))
    commit_dir(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete periodic checkpoints (those with state.json), oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, names: list[str]) -> tuple[dict[str, dict[str, Tensor]],
                                                           dict[str, Any], dict[str, Any]]:
    """(tensors per name, torch state, json meta) of a periodic checkpoint."""
    tensors = {n: load_file(str(path / f"{n}.safetensors")) for n in names
               if (path / f"{n}.safetensors").exists()}
    torch_state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "state.json").read_text())
    return tensors, torch_state, meta


def remove_temporaries(out_dir: Path) -> None:
    """Remove the hidden temporaries a write cut short left in `out_dir` (a full disk, a kill),
    freeing their space; complete checkpoints and final/ stay, so training resumes from them."""
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
            shutil.rmtree(p, ignore_errors=True)


def clear_checkpoints(out_dir: Path) -> None:
    """Remove periodic checkpoints, the final checkpoint and stale temporaries (fresh start)."""
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        if p.is_dir() and (p.name.startswith(PREFIX) or p.name == FINAL
                           or p.name.startswith(".tmp-") or p.name.startswith(".old-")):
            shutil.rmtree(p, ignore_errors=True)
