"""The shared resumable training loop and its small runtime helpers.

Every stage (0 teacher, 1 warm-up, 2 SFVR, 3 pixel fine-tuning) is a `LoopTask`: setup builds
it (models, optimisers, generator), its `step()` is one optimiser step (the thin training step
of DESIGN §4), and `run_loop` does everything else the same way for all stages: resume from the
newest checkpoint, data order, progress bar, metric windows and callbacks, periodic atomic
checkpoints, the non-finite stop, and the final export.

Exact resume (issue 3): all randomness a step uses comes from `task.generator` (masks,
replacement draws, dead-code resets), the data stream (order, crops, flips) or torch's global
RNG (dropout, if any); the states of all three, of the optimisers / grad scalers / EMA and the
step are checkpointed, so on CPU a resumed run ends bitwise equal to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sftok.progress import progress_disabled
from sftok.train import checkpointing as ckpt
from sftok.train.ema import EMA
from sftok.train.optim import lr_at, set_lr

Callback = Callable[[int, dict[str, float]], None]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (or gradient norm); the stage stops (DESIGN §4).

    Attributes: stage, step (1-based optimiser step within the stage), global_step, name (which
    quantity), value, last_checkpoint (Path of the newest good checkpoint, or None).
    """

    def __init__(self, stage: str, step: int, global_step: int, name: str, value: float,
                 last_checkpoint: Path | None):
        self.stage, self.step, self.global_step = stage, step, global_step
        self.name, self.value, self.last_checkpoint = name, value, last_checkpoint
        where = (str(last_checkpoint) if last_checkpoint is not None
                 else "none (no checkpoint written yet)")
        super().__init__(
            f"{stage}: non-finite {name} ({value}) at step {step} (global step {global_step}); "
            f"training stopped. Last good checkpoint: {where}. Lower the learning rate, use "
            f"fp32/bf16 instead of fp16, or check the data, then resume.")

    def __reduce__(self):
        # Ray pickles a trial's exception to the driver; rebuild it from its fields (the
        # default would call __init__ with the message alone and fail).
        return (type(self), (self.stage, self.step, self.global_step, self.name, self.value,
                             self.last_checkpoint))


class NonFinite(Exception):
    """Raised inside a step when a loss is not finite; run_loop turns it into the error above."""

    def __init__(self, name: str, value: float):
        super().__init__(name, value)
        self.name, self.value = name, value


def scalar(value: Tensor | float) -> float:
    """A Python float of a (possibly grad-carrying) scalar tensor."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def check_finite(name: str, value: Tensor | float) -> float:
    """Raise `NonFinite` now (a host sync): for the stages off the hot path. Stages 1-2 return
    their tensors instead and `run_loop` checks them at its boundaries (`FiniteWatch`)."""
    v = scalar(value)
    if not math.isfinite(v):
        raise NonFinite(name, v)
    return v


class FiniteWatch:
    """The first non-finite value among watched scalars, recorded on their device.

    `observe` costs a few device ops and no host sync; `first()` reads the record back (one
    sync) at the loop's logging and checkpoint boundaries, so a NaN is still reported with the
    exact step and quantity, and no checkpoint is ever written after it.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.step: Tensor | None = None  # 0 = nothing bad yet, else the 1-based step
        self.index: Tensor | None = None
        self.value: Tensor | None = None

    def observe(self, step: int, values: dict[str, Tensor]) -> None:
        for name, t in values.items():
            if name not in self.names:
                self.names.append(name)
            t = t.detach().float().reshape(())
            if self.step is None:
                self.step = torch.zeros((), dtype=torch.long, device=t.device)
                self.index = torch.zeros((), dtype=torch.long, device=t.device)
                self.value = torch.zeros((), device=t.device)
            new = ~torch.isfinite(t) & (self.step == 0)
            self.step = torch.where(new, step, self.step)
            self.index = torch.where(new, self.names.index(name), self.index)
            self.value = torch.where(new, t, self.value)

    def first(self) -> tuple[int, str, float] | None:
        """(step, name, value) of the first non-finite value seen, or None."""
        if self.step is None:
            return None
        step, index, value = torch.stack([self.step.double(), self.index.double(),
                                          self.value.double()]).tolist()
        return (int(step), self.names[int(index)], value) if step else None


# --------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else is passed to torch.device.

    A CUDA device also turns TF32 on for matmuls and convolutions: the paper's setting (the
    reference trains with TF32 allowed), about 2x faster fp32 matmuls on Ampere and later.
    On CPU it flushes denormal floats to zero (process-wide): flat image regions (the
    greyscale photos, dead-leaves discs) drive activations into the denormal range, where x86
    float arithmetic is many times slower -- measured on `tiny`'s teacher, 2 threads: 1.35 s
    per step without, 0.22 s with (0.16 vs 0.10 s on the old photo-only data). Values below
    ~1e-38 do not change any result we report.
    """
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if name == "auto" else name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_flush_denormal(True)
    return device


class Precision:
    """Autocast + grad scaling for one optimiser (mixed precision on GPU only).

    bf16 autocast where the GPU supports it (no scaler needed); fp16 autocast with a GradScaler;
    on CPU everything runs in fp32 (CPU autocast is slower than fp32 here and would break the
    bitwise-resume guarantee's simplicity), with one warning if something else was asked for.
    """

    def __init__(self, precision: str, device: torch.device):
        self.device = device
        self.dtype: torch.dtype | None = None
        if device.type == "cuda" and precision == "bf16":
            if torch.cuda.is_bf16_supported():
                self.dtype = torch.bfloat16
            else:
                warnings.warn("bf16 is not supported on this GPU; using fp16 with a GradScaler",
                              stacklevel=2)
                self.dtype = torch.float16
        elif device.type == "cuda" and precision == "fp16":
            self.dtype = torch.float16
        elif precision != "fp32" and device.type != "cuda":
            warnings.warn(f"precision={precision} applies on CUDA only; running fp32 on "
                          f"{device.type}", stacklevel=2)

    @property
    def use_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.use_scaler)


def clip_and_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  params: list[nn.Parameter], grad_clip: float, check: bool = True) -> float:
    """Unscale, clip the global grad norm, step (scaler skips inf steps under fp16).

    Returns the pre-clip grad norm. With fp32/bf16 a non-finite norm means the weights would be
    poisoned, so it stops the stage (`NonFinite`); under fp16 the scaler handles it.
    """
    scaler.unscale_(optimizer)
    norm = _clip(params, grad_clip)
    value = float(norm)
    if check and not scaler.is_enabled() and not math.isfinite(value):
        raise NonFinite("grad_norm", value)
    scaler.step(optimizer)
    scaler.update()
    return value


def clip_and_step_async(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                        params: list[nn.Parameter], grad_clip: float) -> Tensor:
    """`clip_and_step` without reading the norm back: returns it as a device tensor, for the
    caller to hand to `run_loop`'s `FiniteWatch` (a non-finite norm is caught at the next
    boundary, before any checkpoint, rather than before this optimiser step)."""
    scaler.unscale_(optimizer)
    norm = _clip(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return norm.detach()


def _clip(params: list[nn.Parameter], grad_clip: float) -> Tensor:
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


class CompileFallbackWarning(RuntimeWarning):
    """torch.compile failed for a model; it trains in eager mode instead (one line, once)."""


class _CompileGuard:
    """Shared by a model's compiled children: the first failure turns all of them eager."""

    def __init__(self, what: str):
        self.what, self.failed = what, False

    def fail(self, error: Exception) -> None:
        self.failed = True
        text = " ".join(str(error).split())  # dynamo's messages span many lines: keep one
        warnings.warn(f"torch.compile failed for {self.what} ({type(error).__name__}: "
                      f"{text[:240]}); continuing in eager mode", CompileFallbackWarning,
                      stacklevel=2)


class _CompiledForward:
    """A module's forward through torch.compile, with eager mode as the fallback.

    Compiles the class's unbound forward and passes the module in, so a deep copy of the model
    (EMA export) runs its own weights. A call that raises in compiled mode is re-run eagerly:
    if eager raises too the error is genuine and propagates from the eager run; otherwise it
    was the compiler's (no C++ compiler, a Triton or inductor failure, ...) and the guard
    turns every child of the model eager with one warning.
    """

    def __init__(self, module: nn.Module, compiled: Callable, guard: _CompileGuard):
        self.module, self.compiled, self.guard = module, compiled, guard

    def __call__(self, *args, **kwargs):
        if self.guard.failed:
            return type(self.module).forward(self.module, *args, **kwargs)
        try:
            return self.compiled(self.module, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 (told apart from a genuine error just below)
            out = type(self.module).forward(self.module, *args, **kwargs)
            self.guard.fail(e)
            return out

    def __deepcopy__(self, memo):
        return _CompiledForward(copy.deepcopy(self.module, memo), self.compiled, self.guard)


def compile_children(model: nn.Module, backend: str | Callable = "inductor") -> None:
    """torch.compile each direct child's forward in place (state-dict keys unchanged).

    Compilation happens at the first call (and again for new shapes or grad modes); if it
    fails, the model continues in eager mode with one `CompileFallbackWarning` line instead
    of stopping the stage.
    """
    guard = _CompileGuard(type(model).__name__)
    for child in model.children():
        compiled = torch.compile(type(child).forward, backend=backend)
        child.forward = _CompiledForward(child, compiled, guard)


def to_images(batch: Any) -> Tensor:
    """The image tensor B×3×H×W of a data-stream batch (tensor, (images, labels) or dict)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("images", "image", "pixel_values"):
            if key in batch:
                return batch[key]
        raise KeyError(f"batch dict has no images key: {sorted(batch)}")
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if hasattr(batch, "images"):
        return batch.images
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")


# --------------------------------------------------------------------------------------------
# The task interface and the loop
# --------------------------------------------------------------------------------------------


class LoopTask:
    """One stage's trainable state and its training step. Subclasses fill the attributes.

    model: the module exported as the stage's model.safetensors (EMA weights if `ema`).
    optimizer, scaler: the model's; adversary: an optional `Adversary` (discriminator with its
    own optimiser and scaler) for the GAN terms.
    modules(): name -> module whose state dict is checkpointed ("model" must be included).
    optimizers(), scalers(): name -> optimiser / GradScaler, checkpointed.
    step(batches, step): one optimiser step on `grad_accum` micro-batches; `step` is 0-based
    within the stage; returns scalar metrics, floats or 0-dim device tensors (read back only at
    logging boundaries); raises `NonFinite` on a bad loss, or lists the tensor metrics to check
    in `finite_keys` (`run_loop` watches them without a host sync per step).
    """

    finite_keys: tuple[str, ...] = ()

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None = None
    adversary: Any = None
    generator: torch.Generator

    def modules(self) -> dict[str, nn.Module]:
        out = {"model": self.model}
        if self.adversary is not None:
            out.update(self.adversary.modules())
        return out

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out = {"model": self.optimizer}
        if self.adversary is not None:
            out["discriminator"] = self.adversary.optimizer
        return out

    def scalers(self) -> dict[str, torch.amp.GradScaler]:
        out = {"model": self.scaler}
        if self.adversary is not None:
            out["discriminator"] = self.adversary.scaler
        return out

    def step(self, batches: list[Any], step: int) -> dict[str, float]:
        raise NotImplementedError  # abstract: each stage's task defines its update

    def begin_step(self, step: int, steps: int, optim_cfg) -> float:
        """Set the model optimiser's learning rate for `step` of `steps` and clear gradients."""
        lr = lr_at(step, steps, optim_cfg)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def export_module(self) -> nn.Module:
        """The module to export: the model with EMA weights loaded when EMA is on."""
        if self.ema is None:
            return self.model
        out = copy.deepcopy(self.model)
        self.ema.copy_to(out)
        return out


@dataclass
class LoopSpec:
    stage: str  # "stage0" .. "stage3", used in messages and files
    steps: int
    grad_accum: int
    images_per_step: int  # batch_size * grad_accum (for images/s)
    log_every: int
    ckpt_every: int
    config: dict[str, Any]  # resolved config, stored with every checkpoint
    keep: int = 2


@dataclass
class LoopResult:
    final_dir: Path
    steps: int
    metrics: dict[str, float]  # the last logged window
    history: list[dict[str, float]] = field(default_factory=list)  # every logged window



def read_final(out_dir: Path) -> LoopResult | None:
    """The finished stage in out_dir/final, if any (a completed stage is never retrained)."""
    final = out_dir / ckpt.FINAL
    meta_path = final / "stage.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    return LoopResult(final_dir=final, steps=meta["steps"], metrics=meta["metrics"],
                      history=meta.get("history", []))


def run_loop(task: LoopTask, stream: Any, out_dir: Path, spec: LoopSpec,
             export: Callable[[Path, LoopTask], None], callback: Callback | None = None,
             resume: bool = True, step_offset: int = 0,
             init_checkpoint: Path | None = None) -> LoopResult:
    """Train `task` for spec.steps optimiser steps, resumably, and export out_dir/final.

    stream: the data stream (iterable of batches, with state_dict / load_state_dict).
    export(tmp_dir, task): writes the final model files into tmp_dir (then renamed to final/).
    callback(global_step, metrics) every spec.log_every steps and at the last step.
    init_checkpoint: named as the last good checkpoint before this stage wrote its own.
    """
    out_dir = Path(out_dir)
    if resume:
        done = read_final(out_dir)
        if done is not None:
            return done
    else:
        ckpt.clear_checkpoints(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    start, history = 0, []
    latest = ckpt.latest_checkpoint(out_dir) if resume else None
    if latest is not None:
        start, history = _restore(task, stream, latest)
    last_good = latest or init_checkpoint

    it: Iterator = iter(stream)
    bar = tqdm(total=spec.steps, initial=start, desc=spec.stage, dynamic_ncols=True,
               disable=progress_disabled(), leave=False)
    window = _Window()
    watch = FiniteWatch()
    win_images, win_time = 0, 0.0
    metrics: dict[str, float] = history[-1] if history else {}

    def check_watch() -> None:  # one host sync, at boundaries only
        bad = watch.first()
        if bad is not None:
            raise NonFiniteLossError(spec.stage, bad[0], step_offset + bad[0], bad[1], bad[2],
                                     last_good)

    try:
        for step in range(start, spec.steps):
            t0 = time.perf_counter()
            try:
                batches = [next(it) for _ in range(spec.grad_accum)]
            except StopIteration:
                raise RuntimeError(f"{spec.stage}: the training data stream ended at step "
                                   f"{step}; it must be infinite") from None
            try:
                out = task.step(batches, step)
            except NonFinite as e:
                raise NonFiniteLossError(spec.stage, step + 1, step_offset + step + 1, e.name,
                                         e.value, last_good) from None
            watch.observe(step + 1, {k: out[k] for k in task.finite_keys if k in out})
            win_time += time.perf_counter() - t0  # on a GPU: launch time, synced at the window
            win_images += spec.images_per_step
            window.add(out)
            done_steps = step + 1
            bar.update(1)
            last = done_steps == spec.steps
            if done_steps % spec.log_every == 0 or last:
                check_watch()
                metrics = window.means()
                metrics["images_per_s"] = win_images / max(win_time, 1e-9)
                if hasattr(stream, "skipped"):  # undecodable files replaced so far (issue 13)
                    metrics["data_skipped"] = float(stream.skipped)
                history.append({"step": done_steps, **metrics})
                window, win_images, win_time = _Window(), 0, 0.0
                if "loss" in metrics:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                    img_s=f"{metrics['images_per_s']:.1f}", refresh=False)
            if done_steps % spec.ckpt_every == 0 or last:
                check_watch()  # never checkpoint weights a non-finite step has touched
                last_good = _save(task, stream, out_dir, done_steps, history, spec)
            if (done_steps % spec.log_every == 0 or last) and callback is not None:
                callback(step_offset + done_steps, dict(metrics))
    finally:
        bar.close()

    tmp, final = ckpt.atomic_dir(out_dir, ckpt.FINAL)
    export(tmp, task)
    meta = {"stage": spec.stage, "steps": spec.steps, "metrics": metrics, "history": history,
            "ema": task.ema is not None,
            "weights": "EMA weights" if task.ema is not None else "raw weights"}
    (tmp / "stage.json").write_text(json.dumps(meta, indent=1))
    ckpt.commit_dir(tmp, final)
    return LoopResult(final_dir=final, steps=spec.steps, metrics=metrics, history=history)


class _Window:
    """Per-metric sums over a logging window. Tensor metrics are summed on their device and
    read back together (one host sync) by `means()`; float metrics are summed on the host."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, out: dict[str, Tensor | float]) -> None:
        for k, v in out.items():
            v = v.detach().double() if isinstance(v, Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        dev = [k for k, v in self.sums.items() if isinstance(v, Tensor)]
        values = dict(zip(dev, torch.stack([self.sums[k].reshape(()) for k in dev])
                          .tolist())) if dev else {}
        return {k: (values[k] if k in values else float(v)) / self.counts[k]
                for k, v in self.sums.items()}


def _save(task: LoopTask, stream: Any, out_dir: Path, step: int, history: list,
          spec: LoopSpec) -> Path:
    tensors = {name: m.state_dict() for name, m in task.modules().items()}
    if task.ema is not None:
        tensors["ema"] = task.ema.state_dict()
    torch_state = {
        "optimizers": {k: o.state_dict() for k, o in task.optimizers().items()},
        "scalers": {k: s.state_dict() for k, s in task.scalers().items()},
        "rng": ckpt.torch_rng_state(),
        "generator": task.generator.get_state(),
        "data": stream.state_dict() if hasattr(stream, "state_dict") else None,
    }
    meta = {"stage": spec.stage, "python_rng": ckpt.python_rng_state(), "history": history,
            "ema_updates": task.ema.num_updates if task.ema is not None else None,
            "config": spec.config}
    return ckpt.save_checkpoint(out_dir, step, tensors, torch_state, meta, keep=spec.keep)


def _restore(task: LoopTask, stream: Any, path: Path) -> tuple[int, list]:
    names = list(task.modules()) + (["ema"] if task.ema is not None else [])
    tensors, torch_state, meta = ckpt.load_checkpoint(path, names)
    for name, module in task.modules().items():
        module.load_state_dict(tensors[name], strict=True)
    if task.ema is not None:
        task.ema.load_state_dict(tensors["ema"], meta["ema_updates"])
    for k, o in task.optimizers().items():
        o.load_state_dict(torch_state["optimizers"][k])
    for k, s in task.scalers().items():
        s.load_state_dict(torch_state["scalers"][k])
    ckpt.set_torch_rng_state(torch_state["rng"])
    task.generator.set_state(torch_state["generator"])
    ckpt.set_python_rng_state(meta["python_rng"])
    if torch_state.get("data") is not None and hasattr(stream, "load_state_dict"):
        stream.load_state_dict(torch_state["data"])
    return int(meta["step"]), list(meta.get("history", []))
