"""Mask schedules: pure functions of the progress r in [0, 1] (DESIGN §1).

`mask_fraction(name, r)` is the fraction of positions still masked at progress r: 1 at r=0
(everything masked), 0 at r=1 (nothing masked), non-increasing in between.

- Training draws r = t ~ U(0, 1) per sample and masks round(N * fraction) random positions
  (`train_mask_counts`, `random_mask`).
- Inference at step s of S (0-based) uses r = (s+1)/S and keeps
  clamp(floor(N * fraction), 1, #masked - 1) positions masked; the last step keeps none
  (`keep_masked`, `decode_schedule`).

Mask polarity everywhere: in a boolean `masked` tensor, True = masked (to predict).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

ScheduleName = Literal["arccos", "cosine", "linear", "square", "sqrt"]
SCHEDULES: tuple[str, ...] = ("arccos", "cosine", "linear", "square", "sqrt")

Number = float | Tensor


def mask_fraction(name: str, r: Number) -> Number:
    """Fraction of positions still masked at progress `r` in [0, 1] (float or tensor, elementwise).

    arccos: arccos(r) / (pi/2) (MUSE / TiTok / SFTok default); cosine: cos(r pi/2);
    linear: 1 - r; square: 1 - r^2; sqrt: 1 - sqrt(r). A float in gives a float out (float64
    arithmetic, as the reference's numpy); a tensor in gives a tensor out.
    """
    is_tensor = isinstance(r, Tensor)
    if not is_tensor:
        r = float(r)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"mask_fraction: r must be in [0, 1], got {r}")
    m = torch if is_tensor else math
    if name == "arccos":
        return m.acos(r) / (math.pi / 2)
    if name == "cosine":
        return m.cos(r * (math.pi / 2))
    if name == "linear":
        return 1.0 - r
    if name == "square":
        return 1.0 - r * r
    if name == "sqrt":
        return 1.0 - m.sqrt(r)
    raise ValueError(f"unknown mask schedule {name!r} (known: {', '.join(SCHEDULES)})")


# --------------------------------------------------------------------------------------------
# Training: per-sample mask counts and random masks
# --------------------------------------------------------------------------------------------


def train_mask_counts(name: str, t: Tensor, num_positions: int) -> Tensor:
    """Per-sample number of masked positions for training: round(N * mask_fraction(t)), in [1, N].

    t: B floats in [0, 1] (t ~ U(0, 1)) -> LongTensor B. At least one position is always masked
    so that every sample has a masked-position loss term.
    """
    frac = mask_fraction(name, t.double().clamp(0.0, 1.0))
    return torch.round(num_positions * frac).long().clamp(1, num_positions)


def random_mask(batch: int, num_positions: int, schedule: str,
                generator: torch.Generator | None = None, device=None) -> Tensor:
    """Training-time random mask: BoolTensor B×N, True = masked.

    Per sample draw t ~ U(0, 1), then mask `train_mask_counts(schedule, t, N)` positions chosen
    uniformly at random (rank of i.i.d. uniforms < count). All randomness comes from `generator`
    (which must live on `device` when given).
    """
    if batch < 1 or num_positions < 1:
        raise ValueError(f"random_mask: batch and num_positions must be >= 1, "
                         f"got {batch}, {num_positions}")
    device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    t = torch.rand(batch, generator=generator, device=device)
    counts = train_mask_counts(schedule, t, num_positions)  # B
    # The double argsort turns i.i.d. uniforms into a uniformly random permutation rank.
    u = torch.rand(batch, num_positions, generator=generator, device=device)
    rank = u.argsort(-1).argsort(-1)
    return rank < counts[:, None]


# --------------------------------------------------------------------------------------------
# Inference: how many positions stay masked after each decode step
# --------------------------------------------------------------------------------------------


def keep_masked(name: str, num_positions: int, step: int, steps: int, num_masked: int) -> int:
    """Positions still masked after 0-based `step` of `steps`, given `num_masked` masked before it.

    r = (step+1)/steps; keep clamp(floor(N * mask_fraction(r)), 1, num_masked - 1) (the reference
    applies min then max, so it is 1 when num_masked <= 1); the last step keeps 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= step < steps:
        raise ValueError(f"step must be in [0, {steps}), got {step}")
    if step == steps - 1:
        return 0
    r = (step + 1) / steps
    target = math.floor(num_positions * mask_fraction(name, r))
    return max(1, min(num_masked - 1, target))


def decode_schedule(name: str, num_positions: int, steps: int) -> list[int]:
    """Masked counts after each of the S steps (list of S ints, last = 0), starting from N masked.

    The number fixed at step s is `prev - counts[s]` (prev = N for s = 0); they sum to N.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    counts, masked = [], num_positions
    for s in range(steps):
        masked = keep_masked(name, num_positions, s, steps, masked)
        counts.append(masked)
    return counts
