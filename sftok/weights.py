"""Finding pretrained weight files without downloading them (DESIGN §2).

Offline, a feature whose weights are missing is reported unavailable with one message that says
how to provide the file — never a made-up number and never a hidden download.
"""
from __future__ import annotations

import os
from pathlib import Path


def find_weights(label: str, explicit: tuple[str, str | os.PathLike | None], env: str,
                 cached: Path, how: str) -> tuple[Path | None, str]:
    """(file, "") or (None, one message).

    Looks at the explicit argument (`(name, value)`, e.g. `("inception_weights", path)`), then
    the environment variable `env`, then the `cached` file (e.g. in the torch hub cache). An
    explicit or environment path that does not exist is an error, not a fall-through, so a typo
    is not silently replaced by another file. `how` says how to provide the file.
    """
    for origin, p in (explicit, (env, os.environ.get(env))):
        if p:
            if Path(p).is_file():
                return Path(p), ""
            return None, f"{label} not found at {origin}={p}; {how}"
    if cached.is_file():
        return cached, ""
    return None, f"{label} not found (offline, no download attempted); {how}"


# --------------------------------------------------------------------------------------------
# Reading weight files: one line naming the file and what to do, whatever went wrong
# --------------------------------------------------------------------------------------------


class WeightsFileError(ValueError):
    """A weights / checkpoint file that exists but cannot be read (corrupt, truncated, or a
    pickle that `weights_only=True` refuses). The message names the file and the fix."""


def read_safetensors(path: str | os.PathLike, metadata_only: bool = False):
    """Tensors of a `.safetensors` file (or its header metadata); WeightsFileError if the
    file is corrupt or truncated (safetensors' own error does not name the file)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if metadata_only:
            with safe_open(str(path), framework="pt") as f:
                return f.metadata() or {}
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightsFileError(f"{path}: not a readable .safetensors file ({e}); it is corrupt "
                               "or truncated — copy or export it again") from None


def torch_load_tensors(path: str | os.PathLike):
    """`torch.load(weights_only=True)` of a plain tensor / state-dict file.

    A file holding arbitrary pickled objects is refused (a pickle can run code). torch's
    message then advises retrying with weights_only=False, which is the wrong advice for a
    file of unknown origin: the error says instead how to provide a plain weights file.
    """
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines()
                    if ln.strip().startswith(("Trying to load", "Unsupported", "WeightsUnpickler"))),
                   "it holds objects other than tensors")
        raise WeightsFileError(f"{path}: refused, not a plain weights file ({why}); only "
                               "tensors are loaded from pickles — provide a state dict of "
                               "tensors (.bin/.pt) or a .safetensors file") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise WeightsFileError(f"{path}: not a readable torch weights file "
                               f"({type(e).__name__}: {e}); it is corrupt, truncated or of "
                               "another format") from None
