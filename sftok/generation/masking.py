"""Generator training inputs and loss (released MaskGIT recipe; paper §4.3).

Mask polarity, stated once: True = masked (the generator sees `mask_id` there and predicts it).
Per sample t ~ U(0, 1), round(K * arccos(t)/(pi/2)) positions are masked, at least one
(`sftok.schedules.random_mask`, shared with the tokenizer's training). The loss is the
tokenizer's weighted cross-entropy (`sftok.train.losses.weighted_ce`) with label smoothing 0.1:
weight 1 on masked and 0.1 on visible positions, normalised by the weight sum.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sftok.schedules import random_mask
from sftok.train.losses import CEOutput, weighted_ce


def mask_tokens(tokens: Tensor, mask_id: int, schedule: str = "arccos",
                generator: torch.Generator | None = None,
                masked: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """tokens B×K long -> (input ids B×K with mask_id where masked, masked B×K bool).
    masked: the mask (`random_mask`, drawn ahead of the step); None draws it from `generator`."""
    if masked is None:
        b, k = tokens.shape
        dev = generator.device if generator is not None else tokens.device
        masked = random_mask(b, k, schedule, generator, dev)
    masked = masked.to(tokens.device)
    return torch.where(masked, torch.full_like(tokens, mask_id), tokens), masked


def generator_loss(logits: Tensor, targets: Tensor, masked: Tensor, unmasked_weight: float = 0.1,
                   label_smoothing: float = 0.1) -> CEOutput:
    """logits B×K×Q, targets B×K, masked B×K -> weighted, label-smoothed CE (see module doc)."""
    return weighted_ce(logits, targets, masked, unmasked_weight, label_smoothing)
