"""Multi-step masked decoding (DESIGN §1 'Inference'; GOLDEN_README item 5).

Start with every proxy position masked. At step s of S (0-based), r = (s+1)/S:
  1. logits = logits_fn(ids)                                   B×N×V
  2. sample ids: Gumbel-max at temperature tau·(1−r) (tau = 0: argmax); fixed ids are kept
  3. confidence = raw logit of the sampled id (+inf at fixed positions), plus fresh Gumbel
     noise of the same scale tau·(1−r)
  4. keep masked the `keep_masked(...)` least confident positions (schedules.py), fix the rest;
     the last step fixes everything.

tau is the paper's "randomize temperature" (Table 6: 1.0): one knob, `DecodeConfig.temperature`,
annealed as tau·(1−r) and applied to sampling and to the confidence alike, as the reference
sampler does. `DecodeConfig.confidence_noise` (advanced, None = tau) sets the confidence-noise
scale separately. Noise is drawn in this order per step: sampling (B×N×V), then confidence (B×N),
each only when its scale is non-zero.

Mask polarity, stated once: in every boolean `masked` / `masked_before` tensor, True = masked
(still to predict); masked positions hold `mask_id` in `ids`.

Written as a frozen config (`DecodeConfig`) plus an explicit per-step state (`DecodeState`)
advanced by a pure-ish `decode_step` (big_vision `parallel_decode.py`); all randomness comes
from the caller's `torch.Generator`, so a fixed seed is deterministic.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sftok.config import DecodeConfig
from sftok.schedules import SCHEDULES, keep_masked

LogitsFn = Callable[[Tensor], Tensor]  # ids B×N long (mask_id where masked) -> logits B×N×V


@dataclass
class StepTrace:
    """What one decode step saw and did (Figure 4a is computed from a list of these)."""

    logits: Tensor  # B×N×V float32, the step's prediction (detached)
    masked_before: Tensor  # B×N bool, True = masked when the step started
    fixed_now: Tensor  # B×N bool, True = fixed at this step (subset of masked_before)
    ids_after: Tensor  # B×N long, ids after the step (mask_id where still masked)


@dataclass
class DecodeResult:
    ids: Tensor  # B×N long, every position fixed (no mask_id left)
    last_logits: Tensor  # B×N×V, logits of the last step (as returned by logits_fn)
    trace: list[StepTrace] | None  # S entries when trace=True, else None


@dataclass(frozen=True)
class DecodeState:
    """Explicit loop state between steps."""

    ids: Tensor  # B×N long, mask_id at masked positions
    masked: Tensor  # B×N bool, True = masked

    @staticmethod
    def all_masked(batch: int, num_positions: int, mask_id: int, device) -> DecodeState:
        ids = torch.full((batch, num_positions), mask_id, dtype=torch.long, device=device)
        return DecodeState(ids=ids, masked=torch.ones_like(ids, dtype=torch.bool))


def _gumbel(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise, float32, on like.device; u is clamped away from 0 and 1."""
    u = torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log((-torch.log(u.clamp_min(tiny))).clamp_min(tiny))


def _least_confident(confidence: Tensor, masked: Tensor, keep: int) -> Tensor:
    """BoolTensor B×N: exactly `keep` masked positions per row with the lowest confidence.

    Tie rule: order by (fixed last, confidence ascending, position ascending) and take the first
    `keep`. With distinct confidences this equals the reference's `confidence <= cut_off` where
    cut_off is the `keep`-th smallest confidence; under ties the reference would re-mask every
    tied position (more than `keep`), we break ties by position so the count is exact.
    Fixed positions are never chosen, even if a masked logit is +inf too.
    """
    order = torch.sort(confidence, dim=-1, stable=True).indices
    is_fixed = (~masked).gather(-1, order).to(torch.uint8)
    order = order.gather(-1, torch.sort(is_fixed, dim=-1, stable=True).indices)
    out = torch.zeros_like(masked)
    return out.scatter_(-1, order[:, :keep], True)


def decode_step(state: DecodeState, logits: Tensor, step: int, cfg: DecodeConfig, mask_id: int,
                generator: torch.Generator | None = None,
                num_masked: int | None = None) -> tuple[DecodeState, Tensor]:
    """Advance one step given its logits B×N×V; returns (new state, fixed_now B×N bool).

    Requires every row of `state.masked` to hold the same number of masked positions (true for
    states produced by this loop, whose per-step counts are exact). `num_masked`: that count
    when the caller knows it (`decode` does, from the schedule), which saves reading it back
    from the device every step; None counts and checks it.
    """
    n = state.ids.shape[1]
    r = (step + 1) / cfg.steps
    if num_masked is None:
        per_row = state.masked.sum(1)
        num_masked = int(per_row[0])
        if not bool((per_row == num_masked).all()):
            raise ValueError(f"decode_step: rows hold different masked counts "
                             f"{per_row.tolist()}")

    # 2. sample ids (Gumbel-max, annealed temperature) and keep the fixed ones.
    tau = cfg.temperature * (1.0 - r)
    scores = logits if tau == 0 else logits.float() + tau * _gumbel(logits.shape, logits, generator)
    sampled = scores.argmax(dim=-1)  # B×N
    sampled = torch.where(state.masked, sampled, state.ids)

    keep = keep_masked(cfg.schedule, n, step, cfg.steps, num_masked)
    if keep == 0:  # last step: fix everything
        new_masked = torch.zeros_like(state.masked)
    else:
        # 3. confidence = raw logit of the sampled id; +inf where already fixed.
        conf = logits.detach().float().gather(-1, sampled[..., None]).squeeze(-1)
        conf = torch.where(state.masked, conf, torch.full_like(conf, math.inf))
        noise = cfg.confidence_scale * (1.0 - r)
        if noise != 0:
            conf = conf + noise * _gumbel(conf.shape, conf, generator)
        # 4. re-mask the `keep` least confident positions.
        new_masked = _least_confident(conf, state.masked, keep)

    fixed_now = state.masked & ~new_masked
    ids = torch.where(new_masked, torch.full_like(sampled, mask_id), sampled)
    return DecodeState(ids=ids, masked=new_masked), fixed_now


def _validate(batch: int, num_positions: int, mask_id: int, cfg: DecodeConfig) -> None:
    if not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ValueError(f"decode: cfg.steps must be an integer >= 1, got {cfg.steps!r}")
    if batch < 1 or num_positions < 1:
        raise ValueError(f"decode: batch and num_positions must be >= 1, "
                         f"got {batch}, {num_positions}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"decode: unknown schedule {cfg.schedule!r} "
                         f"(known: {', '.join(SCHEDULES)})")
    if not cfg.temperature >= 0:
        raise ValueError(f"decode: cfg.temperature must be >= 0, got {cfg.temperature}")
    if cfg.confidence_noise is not None and not cfg.confidence_noise >= 0:
        raise ValueError(f"decode: cfg.confidence_noise must be >= 0, got {cfg.confidence_noise}")


def _check_logits(logits: Tensor, batch: int, num_positions: int, mask_id: int, step: int) -> None:
    if logits.ndim != 3 or tuple(logits.shape[:2]) != (batch, num_positions):
        raise ValueError(f"decode: logits_fn must return B×N×V = ({batch}, {num_positions}, V) "
                         f"logits, got {tuple(logits.shape)} at step {step}")
    if 0 <= mask_id < logits.shape[-1]:
        raise ValueError(f"decode: mask_id={mask_id} is a valid code of V={logits.shape[-1]}; "
                         "it must lie outside [0, V) (by convention mask_id = V)")


def decode(logits_fn: LogitsFn, batch: int, num_positions: int, mask_id: int, cfg: DecodeConfig,
           generator: torch.Generator | None = None, trace: bool = False,
           device=None) -> DecodeResult:
    """Decode B×N ids in `cfg.steps` masked steps (S = 1 is one-shot argmax/sampling).

    logits_fn: ids B×N long (mask_id at masked positions) -> logits B×N×V on the same device.
    generator: source of all randomness (sampling and confidence noise); must live on the
        logits' device. Unused when both noise scales are 0 (tau = 0: argmax, deterministic).
    device: where the ids live; default the generator's device, else CPU.
    trace: also return S `StepTrace`s (stores S float32 B×N×V logits; off by default).
    The loop does not disable autograd: `last_logits` keeps any graph `logits_fn` built; wrap
    the call in `torch.no_grad()` for pure inference.
    """
    _validate(batch, num_positions, mask_id, cfg)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    state = DecodeState.all_masked(batch, num_positions, mask_id, device)
    steps: list[StepTrace] | None = [] if trace else None
    logits = None
    num_masked = num_positions  # exact per row at every step: the schedule's counts
    for s in range(cfg.steps):
        logits = logits_fn(state.ids)
        _check_logits(logits, batch, num_positions, mask_id, s)
        new_state, fixed_now = decode_step(state, logits, s, cfg, mask_id, generator,
                                           num_masked=num_masked)
        num_masked = keep_masked(cfg.schedule, num_positions, s, cfg.steps, num_masked)
        if steps is not None:
            steps.append(StepTrace(logits=logits.detach().float(), masked_before=state.masked,
                                   fixed_now=fixed_now, ids_after=new_state.ids))
        state = new_state
    return DecodeResult(ids=state.ids, last_logits=logits, trace=steps)
