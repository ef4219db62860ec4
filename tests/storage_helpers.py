"""What the storage-fault tests share: a write that meets a full disk, a one-line check, and a
small tmpfs where this machine lets a test mount one (root; skipped elsewhere)."""
from __future__ import annotations

import contextlib
import errno
import subprocess
from pathlib import Path

import pytest


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def one_line(text: str) -> bool:
    return "\n" not in str(text).strip()


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)
