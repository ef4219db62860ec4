"""Data-parallel scaling of a training stage (issue 19 item 10): images/s at W = 1, 2, ... workers.

`benchmark_scaling(cfg, stage, world_sizes)` measures the real training step (the stage task of
`benchmark.py`, random weights and images) on W processes of `torch.multiprocessing` joined in a
process group (`sftok.distributed.init_workers`: gloo on CPU, NCCL with one GPU per worker), as
a data-parallel trial trains: the stage's `grad_accum` micro-batches of a step dealt over the W
workers (so W must divide it), gradients all-reduced by DDP. Each worker gets
`threads_per_worker` CPU threads (on CPU a worker stands for one device; 1 by default, so W = 2
uses two cores where W = 1 uses one). The W = 1 row runs in a process of its own too, so every
row pays the same start-up and none shares the caller's threads.

A row: {preset, stage, device, workers, batch (the micro-batch), grad_accum (per step, over all
workers), s_per_step, images_per_s (of the whole step), images_per_s_per_worker, efficiency}
with efficiency = images_per_s(W) / (W x images_per_s(W = 1)) (None without a W = 1 row).
Timed after `warmup` steps, between barriers, so a row is as fast as its slowest worker.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.multiprocessing as mp

from sftok.config import ExperimentConfig, from_dict, to_dict
from sftok.distributed import init_workers
from sftok.train.benchmark import _random_teacher, _stage_task, sync


def benchmark_scaling(cfg: ExperimentConfig, stage: str = "stage2",
                      world_sizes: Sequence[int] = (1, 2), steps: int = 5, warmup: int = 2,
                      device: str = "cpu", threads_per_worker: int = 1) -> list[dict]:
    """One row per W in `world_sizes` (module docstring). device: "cpu" (gloo) or "cuda" (NCCL,
    worker r on cuda:r; W GPUs must be visible)."""
    rows = []
    for world in world_sizes:
        accum = _accumulation(cfg, stage, world)
        if device.startswith("cuda") and torch.cuda.device_count() < world:
            raise RuntimeError(f"{world} workers need {world} GPUs (one each); "
                               f"{torch.cuda.device_count()} visible")
        with tempfile.TemporaryDirectory(prefix="sftok-scaling-") as tmp:
            out = Path(tmp) / "row.json"
            init = f"file://{Path(tmp) / 'rendezvous'}"
            mp.spawn(_worker, args=(world, init, to_dict(cfg), stage, steps, warmup, device,
                                    threads_per_worker, str(out)), nprocs=world, join=True)
            row = json.loads(out.read_text())
        rows.append({**row, "grad_accum": accum})
    base = next((r["images_per_s"] for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["images_per_s_per_worker"] = r["images_per_s"] / r["workers"]
        r["efficiency"] = None if base is None else r["images_per_s"] / (r["workers"] * base)
    return rows


def _accumulation(cfg: ExperimentConfig, stage: str, world: int) -> int:
    """The stage's micro-batches per step over all workers; W must divide it."""
    accum = world if stage == "stage0" else getattr(cfg.train, stage).grad_accum
    if accum % world:
        raise ValueError(f"{world} workers cannot share {stage}'s grad_accum {accum} (W must "
                         f"divide it: --set train.{stage}.grad_accum=<a multiple of {world}>)")
    return accum


def _worker(rank: int, world: int, init: str, cfg_dict: dict, stage: str, steps: int,
            warmup: int, device: str, threads: int, out: str) -> None:
    """One worker of a scaling row (spawned): rank 0 writes the row to `out`."""
    torch.set_num_threads(threads)
    os.environ.setdefault("SFTOK_PROGRESS", "0")
    cfg = from_dict(ExperimentConfig, cfg_dict)
    workers = init_workers(rank, world, init,
                           device=f"cuda:{rank}" if device.startswith("cuda") else "cpu")
    dev = torch.device(workers.device or device)
    task, batch, accum, s = _stage_task(cfg, stage, _random_teacher(cfg, dev), dev, None,
                                        workers)
    size = cfg.tokenizer.image_size
    g = torch.Generator().manual_seed(rank)
    images = [torch.rand(batch, 3, size, size, generator=g) for _ in range(accum // world)]
    first = s.gan_start if stage == "stage3" else 0  # stage 3 with its GAN, as benchmark.py
    for i in range(warmup):
        task.step(images, first + i)
    sync(dev)
    workers.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        task.step(images, first + warmup + i)
    sync(dev)
    workers.barrier()
    dt = (time.perf_counter() - t0) / steps
    if workers.is_main:
        Path(out).write_text(json.dumps({
            "preset": cfg.preset, "stage": stage, "device": str(dev) if world == 1 else
            f"{world} x {dev.type}", "workers": world, "batch": batch, "s_per_step": dt,
            "images_per_s": batch * accum / dt}))
    if workers.distributed:
        torch.distributed.destroy_process_group()


def format_scaling(rows: list[dict]) -> str:
    """A markdown table of `benchmark_scaling` rows."""
    lines = [("| preset | stage | W | micro-batch x accum | s/step | images/s | per worker | "
              "efficiency |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = "" if r["efficiency"] is None else f"{r['efficiency']:.0%}"
        lines.append(f"| {r['preset']} | {r['stage']} | {r['workers']} | {r['batch']} x "
                     f"{r['grad_accum']} | {r['s_per_step']:.3f} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s_per_worker']:.1f} | {eff} |")
    return "\n".join(lines)
