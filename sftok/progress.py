"""One reading of the progress-bar setting for every long loop (training, evaluation)."""
from __future__ import annotations

import os


def progress_disabled(requested: bool = True) -> bool | None:
    """tqdm's `disable`: True when the caller or SFTOK_PROGRESS=0/false/no turns bars off,
    False when SFTOK_PROGRESS=1/true/yes forces them on, None (auto: only on a TTY) otherwise."""
    if not requested:
        return True
    flag = os.environ.get("SFTOK_PROGRESS", "").strip().lower()
    if flag in ("0", "false", "no"):
        return True
    if flag in ("1", "true", "yes"):
        return False
    return None
