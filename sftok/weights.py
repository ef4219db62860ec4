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
