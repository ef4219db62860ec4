"""The process group one stage trains on: `Workers` (rank, world size, device) and its collectives.

Data parallelism (issue 19) keeps the meaning of a preset at any number of workers W:
- the micro-batch stays `batch_size` (OptVQ's Sinkhorn balances codes within one forward pass,
  paper §4.1: 32 images per GPU), and `grad_accum` is the number of micro-batches of one
  optimiser step over *all* workers, i.e. the accumulation at W = 1. The effective batch is
  batch_size × grad_accum whatever W is; each worker runs grad_accum / W micro-batches
  (`accum_per_worker`), and a W that does not divide grad_accum is refused with one line.
  (`sftok-b`: 32 × 8 = 256, the paper's 8 GPUs × 32: W = 8 accumulates 1, W = 2 4, W = 1 8.)
- the G = grad_accum micro-batches of a step are numbered j = 0..G-1 in the order one process
  would run them; worker r computes j = a·W + r, a = 0..G/W-1 (`micro_indices`). The data
  stream slices its global batch sequence the same way, and every random draw of a step (masks,
  replacement coins, augmentations) is drawn for all G micro-batches from the task's generator,
  whose state is the same on every rank, before each rank keeps its own: micro-batch j sees
  the same samples and numbers on whichever rank computes it. A W = 2 × A run therefore equals
  a W = 1 × 2A run up to float reduction order.

A single process is `Workers()` (W = 1): every collective is then the identity and no process
group is needed, so the single-device path is today's, bit for bit. Backends: gloo on CPU (the
tests), NCCL when each worker has its own GPU. Collectives run on CPU tensors for gloo and on
the worker's GPU for NCCL. Everything here is torch only (no Ray): Ray Train, `torchrun` and
`torch.multiprocessing` all end in `init_workers` / `Workers.from_process_group`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sftok.config import ConfigError

T = TypeVar("T")

# A collective that waits this long for a rank that never arrives ends with an error instead of
# hanging (torch's default is 30 minutes for gloo, 10 for NCCL).
DEFAULT_TIMEOUT_S = 600.0


class RankFailedError(RuntimeError):
    """Work done by one rank for all of them (writing a checkpoint, building a cache) failed
    there; the other ranks stop with this one line instead of waiting for it."""

    def __init__(self, rank: int, what: str, error: str):
        self.rank, self.what, self.error = rank, what, error
        super().__init__(f"rank {rank} failed while {what}: {error}")

    def __reduce__(self):
        return (type(self), (self.rank, self.what, self.error))


@dataclass(frozen=True)
class Workers:
    """This process's place among the W workers of one stage, and the collectives they share.

    rank in [0, world_size); local_rank: its index on its node (which GPU it uses);
    device: the worker's torch device string (None: the config's `device`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"Workers: rank {self.rank} is not in [0, {self.world_size})")
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Workers with world_size > 1 need an initialised torch.distributed "
                               "process group (init_workers, torchrun or Ray Train)")

    @classmethod
    def from_process_group(cls, device: str | None = None,
                           local_rank: int | None = None) -> Workers:
        """The workers of the process group already initialised in this process (Ray Train,
        torchrun); a single `Workers()` when there is none."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(device=device)
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, device)

    # --- who computes what -------------------------------------------------------------------

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_indices(self, per_worker: int) -> list[int]:
        """Global indices j (0..per_worker·W-1) of this rank's micro-batches in one step."""
        return [a * self.world_size + self.rank for a in range(per_worker)]

    # --- collectives (the identity at W = 1) -------------------------------------------------

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Σ over ranks of `tensor` (a new tensor on `tensor`'s device; `tensor` at W = 1)."""
        if not self.distributed:
            return tensor
        buf = tensor.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """[tensor of rank 0, ..., of rank W-1] (same shape and dtype on every rank)."""
        if not self.distributed:
            return [tensor]
        buf = tensor.detach().contiguous().to(self._comm_device())
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(out, buf)
        return [t.to(tensor.device) for t in out]

    def all_gather_object(self, obj: T) -> list[T]:
        """[obj of rank 0, ..., of rank W-1] for picklable objects (a host sync: boundaries only)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_tensor(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Rank `src`'s tensor (same shape and dtype on every rank)."""
        if not self.distributed:
            return tensor
        buf = tensor.detach().to(self._comm_device(), copy=True)
        dist.broadcast(buf, src=src)
        return buf.to(tensor.device)

    def gather_object(self, obj: T, dst: int = 0) -> list[T] | None:
        """[obj of rank 0, ..., of rank W-1] on rank `dst`, None on the others."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Rank `src`'s obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Gradients ← their mean over ranks, in one flat all-reduce (for modules that are not
        wrapped in DDP: the discriminator, whose LeCam anchors need every micro-batch's logits
        before any backward, see `Adversary.update`). Missing gradients count as zeros."""
        if not self.distributed or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.all_reduce_sum(flat).div_(self.world_size)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    # --- work that one rank does for all ------------------------------------------------------

    def on_main(self, what: str, fn: Callable[[], T], share: bool = True) -> T | None:
        """fn() on rank 0 only (writing a checkpoint, the results); its result (if `share`) on
        every rank afterwards, which also makes this a barrier. If it fails on rank 0, rank 0
        raises the error itself and every other rank a `RankFailedError` naming it: no rank
        waits for a write that never comes."""
        if not self.distributed:
            return fn()
        result, error, exc = None, None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 (re-raised below, after telling the others)
                error, exc = f"{type(e).__name__}: {e}", e
        ok, value, message = self.broadcast_object(
            (error is None, result if share else None, error))
        if exc is not None:
            raise exc
        if not ok:
            raise RankFailedError(0, what, message)
        return result if self.is_main else value

    def main_first(self, what: str, fn: Callable[[], T]) -> T:
        """fn() on rank 0, then on the others (a cache that rank 0 builds and stores, which the
        others then load: teacher ids, palettes, token caches are built once, not W times)."""
        if not self.distributed:
            return fn()
        out = self.on_main(what, fn, share=False)
        return out if self.is_main else fn()


SINGLE = Workers()  # one process: the default everywhere a `workers` argument is taken


# --------------------------------------------------------------------------------------------
# Starting a process group, wrapping a module
# --------------------------------------------------------------------------------------------


def init_workers(rank: int, world_size: int, init_method: str = "env://",
                 backend: str | None = None, device: str | None = None,
                 local_rank: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> Workers:
    """Join (or, at W = 1, skip) the process group of `world_size` workers and return them.

    backend: None = NCCL when `device` is CUDA, else gloo. device: None = "cuda:<local_rank>"
    with NCCL, "cpu" with gloo. init_method: "env://" (MASTER_ADDR / MASTER_PORT, as torchrun
    sets them), "tcp://host:port" or "file:///shared/path".
    """
    local_rank = rank if local_rank is None else local_rank
    if world_size == 1:
        return Workers(device=device)
    if backend is None:
        backend = "nccl" if device is not None and device.startswith("cuda") else "gloo"
    if device is None:
        device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Workers(rank, world_size, local_rank, device)


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Workers:
    """The workers `torchrun` started (RANK, WORLD_SIZE, LOCAL_RANK in the environment)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = None
    if backend == "nccl" or (backend is None and torch.cuda.is_available() and world > 1):
        device = f"cuda:{local}"
    return init_workers(rank, world, "env://", backend, device, local, timeout_s)


def wrap_ddp(module: nn.Module, workers: Workers, device: torch.device,
             ignore: tuple[str, ...] = ()) -> nn.Module:
    """`module` itself at W = 1; else DistributedDataParallel over it.

    ignore: name prefixes of parameters that the wrapped forward never uses (DDP would wait for
    their gradients); set aside with DDP's own ignore list, so the module, its state dict and
    its optimiser are the same at every W. Buffers are synced once, at wrapping, not at every
    forward: every buffer that changes during training is kept equal on all ranks by the task
    that owns it. No `find_unused_parameters`: every step module uses all its parameters but
    the ignored ones (tests/test_data_parallel.py trains each stage, the pixel path present).
    """
    if not workers.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if ignore:
        names = [n for n, _ in module.named_parameters() if n.startswith(ignore)]
        DDP._set_params_and_buffers_to_ignore_for_model(module, names)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               forward_sync_buffers=False, find_unused_parameters=False)


@contextlib.contextmanager
def accumulating(module: nn.Module, last: bool) -> Iterator[None]:
    """Forward and backward of one micro-batch: DDP's `no_sync` (gradients kept locally) for all
    but the last micro-batch of a step, whose backward all-reduces the accumulated gradients."""
    no_sync = getattr(module, "no_sync", None)
    with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
        yield


# --------------------------------------------------------------------------------------------
# World-size invariance: the accumulation per worker
# --------------------------------------------------------------------------------------------


def accum_per_worker(grad_accum: int, batch_size: int, world_size: int, field: str) -> int:
    """Micro-batches each of `world_size` workers runs per optimiser step (module docstring).

    field: the dotted config path of `grad_accum`, named in the error.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if grad_accum % world_size:
        raise ConfigError(field, f"an optimiser step of {grad_accum} micro-batch(es) of "
                                 f"{batch_size} (effective batch {grad_accum * batch_size}) "
                                 f"cannot be split over {world_size} workers; set {field} to a "
                                 f"multiple of {world_size} (it counts micro-batches over all "
                                 f"workers) or use a number of workers that divides {grad_accum}")
    return grad_accum // world_size
