"""Throughput measurements (issue 3 item 7, issue 22): training steps per stage, and decoding.

`benchmark_training` measures the real training step of each stage (`build_stage_task(...).step`,
the teacher's `TeacherTask.step`) on synthetic uniform images with a randomly initialised
teacher: throughput does not depend on the weights, and no data or trained teacher is needed.
The first `warmup` steps (allocation, autotuning, torch.compile) are not timed. Optionally it
also counts the model FLOPs of one step (`count_flops`: matmuls, convolutions and attention,
forward and backward, as torch's FlopCounterMode counts them), records peak GPU memory, and
compiles the tokenizer first. `largest_batch` finds the largest micro-batch whose step fits in
GPU memory, `time_inference` times encode / one decoder pass / S-step decoding.

The throughput of a machine is written as one JSON object, `throughput_record(rows, device)`
= {"device_name", "rows": [benchmark_training rows]}: `scripts/benchmark.py --json` writes it,
`scripts/device_check.py` puts it under "throughput" in its report.json, and
`read_throughput` reads either for `analysis/table5_compute.py`.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sftok.config import ExperimentConfig, override, proxy_grid
from sftok.teacher import FrozenTeacher, MaskGitVQGAN
from sftok.tokenizer import SFTok
from sftok.train.loop import CompileFallbackWarning, compile_children, resolve_device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    """The GPU's name (e.g. 'NVIDIA H100 80GB HBM3'), or 'cpu'."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of `fn()` as torch's FlopCounterMode counts them (matmul, conv, attention; the
    backward too when fn runs one)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def _stage_task(cfg: ExperimentConfig, stage: str, teacher: FrozenTeacher, dev: torch.device,
                batch_size: int | None):
    """(task, micro-batch, grad_accum, stage config or None for stage 0), compile off (the
    caller compiles after counting FLOPs eagerly)."""
    from sftok.train.stages import build_stage_task, stage_config
    from sftok.train.teacher_stage import TeacherTask

    if stage == "stage0":
        return TeacherTask(cfg, dev), batch_size or cfg.train.teacher.batch_size, 1, None
    scfg = override(stage_config(cfg, stage), {f"train.{stage}.compile": False})
    s = getattr(scfg.train, stage)
    return build_stage_task(scfg, stage, teacher, dev), batch_size or s.batch_size, \
        s.grad_accum, s


def _random_teacher(cfg: ExperimentConfig, dev: torch.device) -> FrozenTeacher:
    torch.manual_seed(0)
    return FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size).to(dev)


def benchmark_training(cfg: ExperimentConfig,
                       stages: Sequence[str] = ("stage0", "stage1", "stage2", "stage3"),
                       steps: int = 5, warmup: int = 2, device: str | None = None,
                       batch_size: int | None = None, flops: bool = False,
                       compile_backend: str | None = None,
                       on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Rows {preset, stage, device, batch, grad_accum, images_per_s, s_per_step, precision,
    compiled, mode, first_step_s, peak_mem_gib, model_flops, discriminator, lpips} per stage.

    batch_size overrides every stage's batch size (None: the preset's). flops: count one
    step's model FLOPs (an extra, eager, untimed step; `model_flops` is None otherwise).
    compile_backend: torch.compile the tokenizer's children with it (e.g. "inductor") after
    that count (stages 1-3; `compiled` names the backend, or says "failed (<backend>): eager"
    when it fell back). mode: the row's label in tables, "eager", "compile (<backend>)" or
    "eager (compile (<backend>) failed)". first_step_s: the first warm-up step (compilation
    included). peak_mem_gib: CUDA's peak allocated memory over warm-up and timed steps (None
    on CPU). on_row(row) after each.
    """
    dev = resolve_device(device or cfg.device)
    teacher = _random_teacher(cfg, dev)
    g = torch.Generator().manual_seed(0)
    rows = []
    for stage in stages:
        row = _measure_stage(cfg, stage, teacher, dev, batch_size, g, steps, warmup, flops,
                             compile_backend)
        free_memory(dev)  # the stage's task is gone with _measure_stage's frame
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _measure_stage(cfg: ExperimentConfig, stage: str, teacher: FrozenTeacher,
                   dev: torch.device, batch_size: int | None, g: torch.Generator, steps: int,
                   warmup: int, flops: bool, compile_backend: str | None) -> dict:
    """One `benchmark_training` row."""
    task, batch, accum, s = _stage_task(cfg, stage, teacher, dev, batch_size)
    size = cfg.tokenizer.image_size
    images = [torch.rand(batch, 3, size, size, generator=g) for _ in range(accum)]
    # Stage 3 is timed from gan_start on (GAN + discriminator update included), as for
    # almost all of its steps at paper scale (20k of 1M without, Table 6).
    first = s.gan_start if stage == "stage3" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model_flops = count_flops(lambda: task.step(images, first)) if flops else None
    compiled = None
    if compile_backend and stage != "stage0":
        compile_children(task.model, backend=compile_backend)
        compiled = compile_backend
    first_step = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileFallbackWarning)
        t0 = time.perf_counter()
        for i in range(warmup):
            task.step(images, first + 1 + i)
            if i == 0:
                sync(dev)
                first_step = time.perf_counter() - t0
        sync(dev)
        t0 = time.perf_counter()
        for i in range(steps):
            task.step(images, first + 1 + warmup + i)
        sync(dev)
        dt = (time.perf_counter() - t0) / steps
    mode = f"compile ({compiled})" if compiled else "eager"
    if any(issubclass(w.category, CompileFallbackWarning) for w in caught):
        compiled = f"failed ({compile_backend}): eager"
        mode = f"eager (compile ({compile_backend}) failed)"
    adversary = getattr(task, "adversary", None)
    return {"preset": cfg.preset, "stage": stage, "device": str(dev), "batch": batch,
            "grad_accum": accum, "s_per_step": dt, "images_per_s": batch * accum / dt,
            "precision": precision_of(task), "compiled": compiled, "mode": mode,
            "first_step_s": first_step,
            "peak_mem_gib": (torch.cuda.max_memory_allocated(dev) / 2 ** 30
                             if dev.type == "cuda" else None),
            "model_flops": model_flops,
            "discriminator": type(adversary.disc).__name__ if adversary is not None else None,
            "lpips": getattr(task, "lpips", None) is not None}


def precision_of(task) -> str:
    """'bf16' / 'fp16' / 'fp32': what a stage task's autocast actually runs."""
    dtype = getattr(getattr(task, "precision", None), "dtype", None)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def free_memory(dev: torch.device) -> None:
    """Collect garbage and return cached GPU blocks (between measurements)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def largest_batch(cfg: ExperimentConfig, stage: str = "stage2", device: str | None = None,
                  start: int = 8, limit: int = 4096, time_box: float | None = None,
                  on_probe: Callable[[dict], None] | None = None) -> dict:
    """The largest micro-batch whose `stage` training step fits in memory (grad_accum 1).

    Doubles from `start` until a step runs out of memory (or `limit` is reached), then bisects
    between the largest fitting and the smallest failing size down to 1/16 of the former.
    Stops early, with the bracket so far, after `time_box` seconds. Returns {stage, largest_ok,
    smallest_failed (None: no failure), stopped ("oom bracket" | "limit" | "time box"),
    probes: [{batch, ok, s, peak_mem_gib, error}]}. On CPU nothing runs out: "limit".
    """
    dev = resolve_device(device or cfg.device)
    scfg = override(cfg, {f"train.{stage}.grad_accum": 1})
    task, _, _, s = _stage_task(scfg, stage, _random_teacher(cfg, dev), dev, None)
    size, first = cfg.tokenizer.image_size, (s.gan_start if stage == "stage3" else 0)
    t_start = time.perf_counter()
    ok, failed, probes, step = 0, None, [], 0

    def probe(batch: int) -> bool:
        nonlocal step
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0, error = time.perf_counter(), None
        try:
            task.step([torch.rand(batch, 3, size, size)], first + step)
            sync(dev)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            error = " ".join(str(e).split())[:160]
        step += 1
        task.optimizer.zero_grad(set_to_none=True)
        free_memory(dev)
        rec = {"batch": batch, "ok": error is None, "s": time.perf_counter() - t0,
               "peak_mem_gib": (torch.cuda.max_memory_allocated(dev) / 2 ** 30
                                if dev.type == "cuda" else None), "error": error}
        probes.append(rec)
        if on_probe is not None:
            on_probe(rec)
        return error is None

    def out_of_time() -> bool:
        return time_box is not None and time.perf_counter() - t_start > time_box

    stopped = "limit"
    batch = start
    while batch <= limit:
        if out_of_time():
            stopped = "time box"
            break
        if not probe(batch):
            failed = batch
            break
        ok, batch = batch, batch * 2
    if failed is not None:
        stopped = "oom bracket"
        while failed - ok > max(1, ok // 16):
            if out_of_time():
                stopped = "time box"
                break
            mid = (ok + failed) // 2
            if probe(mid):
                ok = mid
            else:
                failed = mid
    task = None  # (the probe closure holds it) free the model before returning
    free_memory(dev)
    return {"stage": stage, "preset": cfg.preset, "largest_ok": ok or None,
            "smallest_failed": failed, "stopped": stopped, "probes": probes}


def throughput_record(rows: list[dict], device: torch.device | str) -> dict:
    """The one throughput schema: {"device_name": ..., "rows": benchmark_training rows}."""
    return {"device_name": device_name(device), "rows": rows}


def read_throughput(path: str | Path) -> dict:
    """The throughput record of a `scripts/benchmark.py --json` file or of a device check's
    report.json (its "throughput" entry). A file with neither says so in one line."""
    data = json.loads(Path(path).read_text())
    record = data.get("throughput", data) if isinstance(data, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        raise ValueError(  # noqa: TRY004 (the file's content is wrong, not an argument's type)
            f"{path}: no throughput rows (expected the JSON of `scripts/benchmark.py --json` "
            "or a device check's report.json)")
    return record


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
        sync(dev)
        t0 = clock()
        fn()
        sync(dev)
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
    t = MaskGitVQGAN(cfg.teacher)
    m = build_random(cfg, "cpu")
    size, k = cfg.tokenizer.image_size, cfg.tokenizer.num_latent_tokens
    x = torch.rand(1, 3, size, size)
    teacher = count_flops(lambda: t.quantize(t.encode(x)))
    enc = count_flops(lambda: m.encode(x))
    ids = torch.zeros(1, proxy_grid(cfg) ** 2, dtype=torch.long)
    dec = count_flops(lambda: m.decoder_logits(ids, torch.rand(1, k, cfg.tokenizer.token_size)))
    step = teacher + 3 * enc + dec + 3 * dec
    return {"teacher_gflop": teacher / 1e9, "step_gflop": step / 1e9, "share": teacher / step}


# --------------------------------------------------------------------------------------------
# Inference: encode, one decoder pass, S-step decoding
# --------------------------------------------------------------------------------------------


def build_random(cfg: ExperimentConfig, device: torch.device | str,
                 finetune: bool = False) -> SFTok:
    """The preset's tokenizer with random weights, built directly on `device` ("meta" counts
    parameters without allocating them)."""
    tok = dataclasses.replace(cfg.tokenizer, finetune_decoder=finetune)
    with torch.device(device):
        return SFTok(tok, cfg.teacher.codebook_size, proxy_grid(cfg), cfg.teacher)


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of `reps` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_inference(cfg: ExperimentConfig, device: torch.device, batch: int, steps: int,
                   reps: int = 3, warmup: int = 1, amp: bool = False) -> dict[str, float]:
    """{encode_s, pass_s, decode_s, steps, batch}: seconds of encoding `batch` images, of one
    decoder pass over an all-masked grid, and of S-step decoding (`SFTok.generate`), each the
    median of `reps`, for a randomly initialised model (bf16 autocast when amp)."""
    torch.manual_seed(0)
    model = build_random(cfg, device).eval()
    s = cfg.tokenizer.image_size
    images = torch.rand(batch, 3, s, s, device=device)
    masked = torch.full((batch, model.num_positions), model.mask_id, device=device)
    dcfg = dataclasses.replace(cfg.decode, steps=steps)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
        z_q = model.encode(images).z_q
        t_enc = timed(lambda: model.encode(images), device, reps, warmup)
        t_dec = timed(lambda: model.decoder_logits(masked, z_q), device, reps, warmup)
        t_gen = timed(lambda: model.generate(z_q, dcfg), device, reps, warmup)
    return {"encode_s": t_enc, "pass_s": t_dec, "decode_s": t_gen, "steps": steps,
            "batch": batch}
