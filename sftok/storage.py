"""Files that survive storage faults: published whole with a recorded digest, checked when
opened, and one-line errors for a full or unwritable disk.

Every result and cache kept on disk (stage results, trained teachers, floor palettes, token
caches, teacher-id caches) is *published*: written under a temporary name and renamed into place,
so a reader sees all of it or nothing, with a digest (bytes + sha256 per file) recorded at the
same time. Opening checks it — the sizes first (a stat), then the hashes — so a file truncated
or altered afterwards (a killed copy, a full disk during a sync, a bad disk) is detected and
never used: the owner rebuilds it or refuses it in one line (`DamagedFileError`).

- a directory entry: `record_digests(dir, names)` -> {name: {"bytes", "sha256"}}, stored by
  the owner (the stage store's `digests.json`, a teacher's `teacher.json`), and
  `verify_digests(dir, recorded, what)`;
- a single file of tensors: `publish_tensors(path, tensors, metadata, what)` writes a
  safetensors file whose metadata carries the digest of its tensors and metadata
  (`tensors_sha256`), and `open_tensors(path, what)` reads it back verified.

Writes that fail because the disk is full (`ENOSPC`, a quota; also the cryptic errors torch and
safetensors raise for it) become `StorageFullError` naming the path and what was being written
(`writing(path, what)`); a directory that cannot be written is refused before any work starts
(`check_writable`). All three errors are one line and survive pickling (Ray sends a trial's
error to the driver).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

DIGEST_KEY = "sftok.sha256"  # safetensors metadata entry holding the file's digest
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
# The messages of a full disk where no errno survives: the OS's text, Rust's (safetensors),
# SQLite's SQLITE_FULL (an MLflow store).
_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded",
              "database or disk is full")
_LOW_SPACE = 1 << 20  # bytes free below which a failed write is taken for a full disk


class StorageError(RuntimeError):
    """A storage fault, said in one line: `path`, what was being written or read, the cause."""

    def __init__(self, path: str | os.PathLike, what: str, detail: str):
        self.path, self.what, self.detail = str(path), what, detail
        super().__init__(self._text())

    def _text(self) -> str:
        return f"{self.what} at {self.path}: {self.detail}"

    def __reduce__(self):
        return (type(self), (self.path, self.what, self.detail))


class StorageFullError(StorageError):
    """No space left while writing; whatever was half-written was removed, never published."""

    def _text(self) -> str:
        return (f"no space left on the device of {self.path} while writing {self.what}"
                f"{f' ({self.detail})' if self.detail else ''}; nothing half-written was kept "
                "— free space there and run again")


class StorageNotWritableError(StorageError):
    """A directory that cannot be written, found before any work that would need it."""

    def _text(self) -> str:
        return (f"cannot write to {self.path} ({self.what}): {self.detail}; make it writable "
                "or choose another directory")


class DamagedFileError(StorageError):
    """A published file that does not match its recorded digest (or has none)."""


class DamagedFileWarning(UserWarning):
    """A damaged cache entry was found and is being rebuilt (`rebuilding`)."""


def rebuilding(err: DamagedFileError, action: str = "rebuilding it") -> None:
    """Say in one line (a warning) that a damaged entry is not used and what happens instead."""
    warnings.warn(f"{err}; {action}", DamagedFileWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------
# Full and unwritable disks
# --------------------------------------------------------------------------------------------


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(p).free
            return None
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, innermost last."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Did `exc` (or an exception it was raised from) come from a full disk?

    OSError ENOSPC / EDQUOT; safetensors' "No space left on device (os error 28)"; SQLite's
    "database or disk is full"; and torch's zip writer, whose message says nothing
    ("unexpected pos ..."), when the device of `path` has (almost) no space left.
    """
    for e in _chain(exc):
        if isinstance(e, StorageFullError):
            return True
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
    if path is not None and isinstance(exc, (OSError, RuntimeError, SafetensorError)):
        free = _free_bytes(Path(path))
        return free is not None and free < _LOW_SPACE
    return False


def storage_error_in(exc: BaseException) -> StorageError | None:
    """The first `StorageError` in `exc`'s chain (e.g. under a TuneError a Ray callback's
    failure became), None if there is none."""
    return next((e for e in _chain(exc) if isinstance(e, StorageError)), None)


def _filename(exc: BaseException) -> str | None:
    """The file an OSError in `exc`'s chain names: of a two-path call (a copy, a rename) the
    destination, `filename2` — shutil's copy puts the source in `filename`, and a full disk is
    the destination's."""
    return next((str(e.filename2 or e.filename) for e in _chain(exc)
                 if isinstance(e, OSError) and (e.filename2 or e.filename)), None)


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a full disk met inside the block into `StorageFullError(path, what)`; other errors
    (and storage errors raised deeper, which name their own path) pass unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        if disk_full(e, path):
            where = _filename(e) or path
            raise StorageFullError(where, what, "") from e
        if isinstance(e, OSError) and e.errno in _READ_ONLY:
            raise StorageNotWritableError(_filename(e) or path, what, e.strerror or str(e)
                                          ) from e
        raise


def check_writable(directory: str | os.PathLike, what: str) -> Path:
    """Create `directory` if needed and write (then remove) a small probe file in it, so that a
    read-only or full directory is refused in one line before the work that would write there."""
    d = Path(directory).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}-{time.monotonic_ns()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"sftok")
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as e:
        if disk_full(e):
            raise StorageFullError(d, what, "before any work started") from None
        raise StorageNotWritableError(d, what, e.strerror or str(e)) from None
    return d


# --------------------------------------------------------------------------------------------
# Digests of directory entries
# --------------------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex} of one file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def record_digests(directory: str | os.PathLike, names: Iterable[str] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """{relative name: file_digest} of `names` in `directory` (default: every file in it,
    recursively), to be stored by the entry's owner when it publishes the entry."""
    d = Path(directory)
    if names is None:
        names = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    return {n: file_digest(d / n) for n in names}


def verify_digests(directory: str | os.PathLike, recorded: dict[str, dict[str, Any]],
                   what: str, full: bool = True) -> None:
    """Check the files of a published entry against their recorded digests: every size first
    (cheap: it finds a truncated file without reading anything), then, with `full`, every
    sha256. Raises `DamagedFileError` naming the first file that differs."""
    d = Path(directory)
    if not recorded:
        raise DamagedFileError(d, what, "no digest was recorded for it")
    for name, rec in recorded.items():
        p = d / name
        if not p.is_file():
            raise DamagedFileError(p, what, "file missing")
        size = p.stat().st_size
        if size != rec["bytes"]:
            raise DamagedFileError(p, what, f"{size:,} bytes, {rec['bytes']:,} when it was "
                                            "published (truncated or replaced)")
    if full:
        for name, rec in recorded.items():
            if file_digest(d / name)["sha256"] != rec["sha256"]:
                raise DamagedFileError(d / name, what, "its content does not match the digest "
                                                       "recorded when it was published")


def set_aside(path: str | os.PathLike, root: str | os.PathLike) -> Path | None:
    """Move a damaged entry out of the way, to `root/.damaged/<name>-<time>` (kept for a look,
    never read again); None if it is gone already (another process moved it first)."""
    path, target_dir = Path(path), Path(root) / ".damaged"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return target


# --------------------------------------------------------------------------------------------
# Single files of tensors
# --------------------------------------------------------------------------------------------


def tensors_sha256(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """sha256 over tensors (names, dtypes, shapes, bytes, in name order) and metadata items.

    Over the content, not a file's bytes: two equal tensor sets whose safetensors headers are
    laid out differently have the same digest.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    for k, v in sorted((metadata or {}).items()):
        if k != DIGEST_KEY:
            h.update(f"meta|{k}|{v}|".encode())
    return h.hexdigest()


def publish_tensors(path: str | os.PathLike, tensors: dict[str, Tensor],
                    metadata: dict[str, str] | None, what: str) -> Path:
    """Write a safetensors file atomically, its digest in its metadata (`DIGEST_KEY`).

    A full disk raises `StorageFullError` and leaves neither the temporary file nor a partial
    `path`; concurrent writers of the same content replace it whole.
    """
    path = Path(path)
    meta = dict(metadata or {})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta[DIGEST_KEY] = tensors_sha256(tensors, meta)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with writing(path, what):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return path


def open_tensors(path: str | os.PathLike, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by `publish_tensors`, its digest checked.

    Raises `DamagedFileError` for a file that cannot be parsed (truncated, overwritten), that
    has no recorded digest (written by an older version) or whose content does not match it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    try:  # safetensors checks the header against the file's length: truncation is caught here
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = f.keys()  # a safe_open handle is not iterable
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, ValueError, OSError) as e:
        raise DamagedFileError(path, what, f"unreadable ({' '.join(str(e).split())})") from None
    if DIGEST_KEY not in meta:
        raise DamagedFileError(path, what, "no digest recorded (written by an older version)")
    if tensors_sha256(tensors, meta) != meta[DIGEST_KEY]:
        raise DamagedFileError(path, what, "its content does not match the digest recorded "
                                           "when it was published")
    return tensors, meta


__all__ = [
    "DIGEST_KEY",
    "DamagedFileError",
    "DamagedFileWarning",
    "StorageError",
    "StorageFullError",
    "StorageNotWritableError",
    "check_writable",
    "disk_full",
    "file_digest",
    "open_tensors",
    "publish_tensors",
    "rebuilding",
    "record_digests",
    "set_aside",
    "storage_error_in",
    "tensors_sha256",
    "verify_digests",
    "writing",
]
