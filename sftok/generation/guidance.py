"""Classifier-free guidance for the generator's sampling loop (released generator code).

Convention of the released code: guided = cond + s_k * (cond - uncond); s_k = 0 is the
conditional model alone (so "s = 4.5" there is 5.5 in the `uncond + w (cond - uncond)` form).
Schedules of s_k over the 0-based step k of S:
  constant      s_k = s
  linear        s_k = s * k / S                       (MUSE; step 0 is unguided)
  power-cosine  s_k = (s - 1) * (1 - cos(pi * (k/S)^p)) / 2      (MDT, p = guidance_power)
The released code writes power-cosine in the other form, uncond + w_k (cond - uncond) with
w_k = (s - 1) * c_k + 1; the two are the same logits, so here it is s_k = w_k - 1.

`GuidedLogits` is the `logits_fn` that `sftok.decoding.decode` calls once per step: decode has
no step argument, so the closure counts its calls. When s_k != 0 it runs one batched forward of
2B rows ([ids ; ids] with [labels ; null]) and splits it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sftok.config import SamplingConfig

GUIDANCE_SCHEDULES = ("constant", "linear", "power-cosine")


def guidance_scale(schedule: str, scale: float, step: int, steps: int,
                   power: float = 3.0) -> float:
    """s_k of the 0-based `step` of `steps` (see the module docstring)."""
    if not 0 <= step < steps:
        raise ValueError(f"guidance_scale: step must be in [0, {steps}), got {step}")
    if schedule == "constant":
        return float(scale)
    if schedule == "linear":
        return float(scale) * step / steps
    if schedule == "power-cosine":
        c = (1.0 - math.cos(math.pi * (step / steps) ** power)) / 2.0
        return (float(scale) - 1.0) * c
    raise ValueError(f"unknown guidance schedule {schedule!r} "
                     f"(known: {', '.join(GUIDANCE_SCHEDULES)})")


def combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """cond + scale * (cond - uncond), elementwise (B×K×Q)."""
    return cond + scale * (cond - uncond)


class GuidedLogits:
    """logits_fn(ids B×K) -> guided logits B×K×Q for `decode`, one call per step.

    model(ids B×K, labels B) -> B×K×Q with `model.null_label`; labels B fixed for the run.
    Softmax-temperature annealing (optional, released code): logits / (0.5 + 0.8 (1 - r)).
    """

    def __init__(self, model, labels: Tensor, cfg: SamplingConfig):
        self.model, self.labels, self.cfg = model, labels, cfg
        self.step = 0
        self.scales: list[float] = []  # s_k actually used, one per step (for tests and logs)

    def __call__(self, ids: Tensor) -> Tensor:
        cfg, k = self.cfg, self.step
        if k >= cfg.steps:
            raise RuntimeError(f"GuidedLogits: called {k + 1} times for {cfg.steps} steps; "
                               "use a fresh one per decode")
        s = guidance_scale(cfg.guidance_schedule, cfg.guidance_scale, k, cfg.steps,
                           cfg.guidance_power)
        if s == 0:
            logits = self.model(ids, self.labels)
        else:
            null = torch.full_like(self.labels, self.model.null_label)
            both = self.model(torch.cat([ids, ids]), torch.cat([self.labels, null]))
            cond, uncond = both.chunk(2)
            logits = combine(cond, uncond, s)
        if cfg.softmax_annealing:
            logits = logits / (0.5 + 0.8 * (1.0 - (k + 1) / cfg.steps))
        self.scales.append(s)
        self.step += 1
        return logits
