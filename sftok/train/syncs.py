"""Finding host syncs in a training step: the library's own reads of device tensors.

On a GPU every read of a device tensor's value by the host waits for all the kernels queued
before it, so a training step that does one per micro-batch runs the GPU in lock-step with
Python. Stages 1-3 are written to read nothing back (their metrics stay 0-dim device tensors
until `run_loop`'s logging boundaries). Two ways to check that:

- `HostReads` (any device, CPU included): records, by file and line, every call made *directly
  by code under `root`* (default: this package) that would wait for the GPU on CUDA:
  `float()` / `int()` / `bool()` / `.item()` / `.tolist()` / `.numpy()` / `.cpu()` of a tensor,
  ops whose output size depends on values (`nonzero`, boolean-mask indexing, `masked_select`,
  `unique`, `bincount`, `repeat_interleave` without a size, `equal`), and device moves
  `.to(device)` / `.cuda()` without `non_blocking=True` (a host-to-device copy of a CPU draw
  synchronises the stream unless it is non-blocking). Calls that torch makes internally (e.g.
  a CPU optimiser's step counter) are not the library's and are not recorded.
- `cuda_syncs()` (CUDA only): torch's own sync debug mode, which sees every synchronising CUDA
  call, torch's internals included; the device check runs the real steps under it.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LIB = Path(__file__).resolve().parent.parent

# Tensor methods that hand values to the host without an aten op the dispatch mode below sees
# on CPU (float(), int(), bool(), .item() all reach it as `_local_scalar_dense`).
READ_METHODS = ("tolist", "numpy", "cpu")
_NAMES = {"aten::_local_scalar_dense": "scalar read (float/int/bool/item)"}
# aten ops whose output (a size or a Python value) depends on the data: a sync on CUDA.
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
             "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
             "aten::unique_dim_consecutive", "aten::bincount", "aten::equal",
             "aten::repeat_interleave"}
_BOOL_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
_TORCH = Path(torch.__file__).resolve().parent
# Frames between an op's caller and the dispatch mode: this module, torch's thin Python
# wrappers (torch.unique, Tensor methods written in Python) and its dispatch plumbing. Any
# other torch frame (an optimiser, clip_grad_norm_) means the op is torch's own, not ours.
_TRANSPARENT = (str(Path(__file__).resolve()),
                *(str(_TORCH / f) for f in ("_dynamo/eval_frame.py", "_compile.py",
                                            "functional.py", "_jit_internal.py", "_tensor.py",
                                            "overrides.py", "_ops.py",
                                            "utils/_python_dispatch.py")))


def _is_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in (indices or ()))


def _wants_device(args: tuple, kwargs: dict) -> bool:
    """Whether `Tensor.to(*args, **kwargs)` names a device (a move, not only a dtype cast)."""
    if "device" in kwargs:
        return True
    return any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)


class HostReads(contextlib.AbstractContextManager):
    """Context manager: `.calls` lists "what at file:line" for each host read made directly by
    code under `root` (module docstring) while it is active. Not thread-safe (tests only)."""

    def __init__(self, root: str | Path = LIB):
        self.root = str(Path(root).resolve())
        self.calls: list[str] = []
        self._undo: list[tuple[str, object]] = []
        self._mode: _SyncOpMode | None = None

    def _record(self, what: str, frame) -> None:
        if frame is not None and frame.f_code.co_filename.startswith(self.root):
            self.calls.append(f"{what} at {Path(frame.f_code.co_filename).name}:"
                              f"{frame.f_lineno}")

    def __enter__(self) -> Self:
        for name in READ_METHODS:
            self._patch(name, self._reader(name, getattr(torch.Tensor, name)))
        self._patch("to", self._mover(torch.Tensor.to, "to"))
        self._patch("cuda", self._mover(torch.Tensor.cuda, "cuda", always=True))
        self._mode = _SyncOpMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for name, real in reversed(self._undo):
            setattr(torch.Tensor, name, real)
        self._undo.clear()

    def _patch(self, name: str, wrapper) -> None:
        self._undo.append((name, getattr(torch.Tensor, name)))
        setattr(torch.Tensor, name, wrapper)

    def _reader(self, name: str, real):
        def wrapper(tensor, *a, **k):
            self._record(name, sys._getframe(1))
            return real(tensor, *a, **k)

        return wrapper

    def _mover(self, real, name: str, always: bool = False):
        def wrapper(tensor, *a, **k):
            if (always or _wants_device(a, k)) and not k.get("non_blocking", False):
                self._record(f"blocking .{name}(device)", sys._getframe(1))
            return real(tensor, *a, **k)

        return wrapper

    @staticmethod
    def caller():
        """The frame that called the op being dispatched (past `_TRANSPARENT` frames)."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(_TRANSPARENT):
            frame = frame.f_back
        return frame


class _SyncOpMode(TorchDispatchMode):
    """Sees every aten op; records the data-dependent ones called directly from `root`."""

    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        sized = name == "aten::repeat_interleave" and (kwargs or {}).get("output_size")
        if (name in _SYNC_OPS and not sized) or (name in _BOOL_INDEX_OPS
                                                 and _is_bool_index(args)):
            self.reads._record(_NAMES.get(name, name.removeprefix("aten::")),
                               self.reads.caller())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_syncs() -> Iterator[list[str]]:
    """CUDA only: yields a list that collects "file:line" of every synchronising CUDA call
    made while active (torch's sync debug mode in "warn"; torch's internals included)."""
    found: list[str] = []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "synchronizing" in str(w.message):
            found.append(f"{Path(w.filename).name}:{w.lineno}")
        else:  # not ours: hand it on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
