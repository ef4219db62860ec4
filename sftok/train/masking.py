"""Training-time masking and visible-token replacement (DESIGN §1 'Training-time masking').

Mask polarity, stated once: in a boolean `masked` tensor, True = masked (the decoder sees the
mask id `V` there and must predict it), False = visible (the decoder sees some id there).

Strategies for what a *visible* position carries (B batch, N proxy positions, V teacher codes):
- `none`    (stage 1 warm-up, "single-step"): nothing is visible, every position is masked.
- `vanilla` (MaskGIT-style baseline of Table 3): the ground-truth teacher id `M_g`.
- `sfvr`    (self-forcing, paper §3): the argmax `M̂_1` of a no-grad all-masked forward pass of
            the current weights (exactly inference step 1); each visible position independently
            takes `M̂_1` with probability `replace_ratio` (Table 4), else `M_g`.

All randomness comes from an explicit `torch.Generator` so that a resumed run draws the same
masks and replacements as an uninterrupted one (exact resume, issue 3).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sftok.schedules import random_mask

STRATEGIES = ("none", "vanilla", "sfvr")


@dataclass
class ProxyInputs:
    """What the decoder sees in one training step."""

    ids: Tensor  # B×N long: mask_id where masked, else M_g or M̂_1
    masked: Tensor  # B×N bool, True = masked (weight 1 in the loss)
    replaced: Tensor  # B×N bool, True = visible position that took M̂_1 instead of M_g


def _draw(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """Uniforms on the generator's device (CPU by default): the caller moves them."""
    return torch.rand(shape, generator=generator,
                      device=generator.device if generator is not None else "cpu")


def sample_mask(strategy: str, batch: int, num_positions: int, schedule: str,
                generator: torch.Generator | None, device=None) -> Tensor:
    """B×N bool mask (True = masked) for one training step.

    `none` masks everything (DESIGN: "everything masked (mask_all)"); `vanilla` and `sfvr` draw
    t ~ U(0,1) per sample and mask round(N·fraction(t)) uniformly chosen positions
    (`schedules.random_mask`, drawn on the generator's device and moved to `device`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown replacement strategy {strategy!r} (known: {STRATEGIES})")
    if strategy == "none":
        return torch.ones(batch, num_positions, dtype=torch.bool, device=device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    # non_blocking: a CPU draw moved to the GPU must not wait for the queued kernels
    return random_mask(batch, num_positions, schedule, generator,
                       gen_device).to(device, non_blocking=True)


def step1_logits_fn(model, z_q: Tensor, fp32: bool = True) -> Callable[[Tensor], Tensor]:
    """The SFVR step-1 pass of `model` (anything with `decoder_logits(ids B×N, z_q B×K×C)`),
    conditioned on z_q (no gradient is needed: `build_proxy_inputs` runs it under no_grad).

    fp32=True: autocast off and z_q in float32, as the reference runs `generate_guided_mask`
    (outside its autocast wrapper); the argmax of bf16/fp16 logits can flip at near-ties.
    """
    z = z_q.detach()

    def fn(ids: Tensor) -> Tensor:
        if not fp32:
            return model.decoder_logits(ids, z)
        with torch.autocast(z.device.type, enabled=False):
            return model.decoder_logits(ids, z.float())

    return fn


def build_proxy_inputs(targets: Tensor, masked: Tensor, mask_id: int, strategy: str,
                       replace_ratio: float = 1.0,
                       first_step_fn: Callable[[Tensor], Tensor] | None = None,
                       generator: torch.Generator | None = None) -> ProxyInputs:
    """Decoder input ids for one training step.

    targets: B×N long, the teacher ids M_g. masked: B×N bool (True = masked).
    first_step_fn(all_masked_ids B×N) -> logits B×N×V: only called for `sfvr`, under no_grad;
    it must be a forward pass of the *current* weights with the same condition tokens.
    The replacement draw happens for every position (even masked ones, where it is ignored) so
    the generator advances by a fixed amount per step whatever the mask looks like.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown replacement strategy {strategy!r} (known: {STRATEGIES})")
    ids = torch.where(masked, torch.full_like(targets, mask_id), targets)
    replaced = torch.zeros_like(masked)
    if strategy == "sfvr":
        if first_step_fn is None:
            raise ValueError("sfvr needs first_step_fn (the all-masked step-1 forward pass)")
        with torch.no_grad():
            all_masked = torch.full_like(targets, mask_id)
            first = first_step_fn(all_masked).argmax(-1)  # M̂_1, B×N
        coin = _draw(tuple(targets.shape), generator).to(targets.device,
                                                         non_blocking=True) < replace_ratio
        replaced = coin & ~masked
        ids = torch.where(replaced, first, ids)
    return ProxyInputs(ids=ids, masked=masked, replaced=replaced)
