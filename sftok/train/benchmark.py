"""Training-step throughput (images/s) per stage for a preset (issue 3 item 7).

Measures the real training step of each stage (`build_stage_task(...).step`, the teacher's
`TeacherTask.step`) on synthetic uniform images with a randomly initialised teacher: throughput
does not depend on the weights, and no data or trained teacher is needed. The first `warmup`
steps (allocation, autotuning, torch.compile) are not timed.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from sftok.config import ExperimentConfig
from sftok.teacher import FrozenTeacher, MaskGitVQGAN
from sftok.train.loop import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_training(cfg: ExperimentConfig,
                       stages: Sequence[str] = ("stage0", "stage1", "stage2", "stage3"),
                       steps: int = 5, warmup: int = 2, device: str | None = None,
                       batch_size: int | None = None) -> list[dict[str, float | str]]:
    """Rows {preset, stage, device, batch, grad_accum, images_per_s, s_per_step} per stage.

    batch_size overrides every stage's batch size (None: the preset's).
    """
    from sftok.train.stages import build_stage_task, stage_config
    from sftok.train.teacher_stage import TeacherTask

    dev = resolve_device(device or cfg.device)
    torch.manual_seed(0)
    teacher = FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size).to(dev)
    size = cfg.tokenizer.image_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for stage in stages:
        if stage == "stage0":
            task = TeacherTask(cfg, dev)
            batch, accum = batch_size or cfg.train.teacher.batch_size, 1
        else:
            scfg = stage_config(cfg, stage)
            s = getattr(scfg.train, stage)
            batch, accum = batch_size or s.batch_size, s.grad_accum
            task = build_stage_task(scfg, stage, teacher, dev)
        images = [torch.rand(batch, 3, size, size, generator=g) for _ in range(accum)]
        # Stage 3 is timed from gan_start on (GAN + discriminator update included), as for
        # almost all of its steps at paper scale (20k of 1M without, Table 6).
        first = s.gan_start if stage == "stage3" else 0
        for i in range(warmup):
            task.step(images, first + i)
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(steps):
            task.step(images, first + warmup + i)
        _sync(dev)
        dt = (time.perf_counter() - t0) / steps
        rows.append({"preset": cfg.preset, "stage": stage, "device": str(dev), "batch": batch,
                     "grad_accum": accum, "s_per_step": dt,
                     "images_per_s": batch * accum / dt})
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of `benchmark_training` rows."""
    head = "| preset | stage | device | batch×accum | s/step | images/s |\n|---|---|---|---|---|---|"
    lines = [f"| {r['preset']} | {r['stage']} | {r['device']} | {r['batch']}×{r['grad_accum']} "
             f"| {r['s_per_step']:.3f} | {r['images_per_s']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def teacher_share(cfg: ExperimentConfig, steps: int = 3, warmup: int = 1,
                  device: str | None = None, batch_size: int | None = None,
                  stage: str = "stage2") -> dict[str, float | str]:
    """The teacher's share of a stage-1/2 step, measured (issue 10 item 4).

    Times, per micro-batch of `batch_size` random images (grad_accum 1; the share does not
    depend on accumulation): the teacher's `encode_ids` alone, the whole step encoding the
    ids on the fly, and the whole step with the ids looked up in a `TeacherIdCache` of the
    same images. Returns {preset, device, batch, teacher_s, step_s, cached_step_s, share,
    speedup, clock}; share = teacher_s / step_s. Each time is the median over `steps`
    interleaved rounds; on CPU it is process CPU time (see below), on CUDA wall time.
    """
    import dataclasses

    from sftok.train.stages import build_stage_task, stage_config
    from sftok.train.teacher_ids import TeacherIdCache

    dev = resolve_device(device or cfg.device)
    scfg = stage_config(cfg, stage)
    s = getattr(scfg.train, stage)
    batch = batch_size or s.batch_size
    scfg = dataclasses.replace(scfg, train=dataclasses.replace(
        scfg.train, **{stage: dataclasses.replace(s, grad_accum=1, batch_size=batch)}))
    torch.manual_seed(0)
    teacher = FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size).to(dev)
    size = cfg.tokenizer.image_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    class _Pool:  # the batch itself, declared a pool
        def __len__(self):
            return batch

        def sample(self, i, seed=None):
            return images[i], 0

        def pool_key(self):
            return "benchmark"

    # On CPU the process's CPU time, not wall time: on a shared machine the wall clock measures
    # the neighbours (use 1 thread, or CPU time also counts the threads' spin-waiting).
    clock = time.process_time if dev.type == "cpu" else time.perf_counter

    def once(fn) -> float:
        _sync(dev)
        t0 = clock()
        fn()
        _sync(dev)
        return clock() - t0

    task = build_stage_task(scfg, stage, teacher, dev)
    cache = TeacherIdCache.load_or_build(teacher, _Pool(), None, "benchmark", dev)
    step = [0]

    def train_step(cached: bool) -> None:
        task.id_cache = cache if cached else None
        task.step([(images, None)], step[0])
        step[0] += 1

    # Interleaved (teacher, step encoding, step with cached ids) rounds: on a shared machine
    # the three see the same load; medians over the rounds.
    times: dict[str, list[float]] = {"teacher": [], "encode": [], "cached": []}
    with torch.no_grad():
        teacher.encode_ids(images.to(dev))
    for r in range(warmup + steps):
        with torch.no_grad():
            t = once(lambda: teacher.encode_ids(images.to(dev)))
        e = once(lambda: train_step(False))
        c = once(lambda: train_step(True))
        if r >= warmup:
            for k, v in (("teacher", t), ("encode", e), ("cached", c)):
                times[k].append(v)
    assert cache.misses == 0
    teacher_s, step_s, cached_s = (statistics.median(times[k])
                                   for k in ("teacher", "encode", "cached"))
    return {"preset": cfg.preset, "device": str(dev), "batch": batch, "teacher_s": teacher_s,
            "step_s": step_s, "cached_step_s": cached_s, "share": teacher_s / step_s,
            "speedup": step_s / cached_s,
            "clock": "cpu time" if dev.type == "cpu" else "wall"}


@torch.no_grad()
def teacher_flop_share(cfg: ExperimentConfig) -> dict[str, float]:
    """FLOP estimate per image of the teacher's encoding and of a stage-2 step (batch 1, CPU).

    Counted with torch's FlopCounterMode on forward passes: step = teacher + 3 x encoder
    (forward + backward ~ 2 x forward) + the no-grad SFVR step-1 decoder pass + 3 x decoder.
    Returns {teacher_gflop, step_gflop, share}.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from sftok.config import proxy_grid
    from sftok.tokenizer import SFTok

    t = MaskGitVQGAN(cfg.teacher)
    m = SFTok(cfg.tokenizer, cfg.teacher.codebook_size, proxy_grid(cfg), cfg.teacher)
    size, k = cfg.tokenizer.image_size, cfg.tokenizer.num_latent_tokens
    x = torch.rand(1, 3, size, size)

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())

    teacher = flops(lambda: t.quantize(t.encode(x)))
    enc = flops(lambda: m.encode(x))
    ids = torch.zeros(1, proxy_grid(cfg) ** 2, dtype=torch.long)
    dec = flops(lambda: m.decoder_logits(ids, torch.rand(1, k, cfg.tokenizer.token_size)))
    step = teacher + 3 * enc + dec + 3 * dec
    return {"teacher_gflop": teacher / 1e9, "step_gflop": step / 1e9, "share": teacher / step}
