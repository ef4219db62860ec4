"""Token-level metrics (issue 4, item 2).

- Step-1 prediction vs the teacher: the decoder's all-masked prediction (= inference step 1,
  the prediction SFVR feeds back, DESIGN §1) scored against the teacher's ids M_g:
  top-1 accuracy and cross-entropy (nats), averaged over all B×N positions.
- Codebook usage of the tokenizer's ids (B×K over Q codes): the fraction of the Q codes used
  at least once, and the entropy of the empirical code distribution (bits; max log2 Q).

Streaming: `TokenAccumulator` keeps sums and a Q-bin histogram, never the ids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def step1_token_sums(logits: Tensor, target: Tensor) -> tuple[float, float, int]:
    """(Σ correct, Σ CE, count) of logits B×N×V against target ids B×N."""
    logits = logits.float()
    correct = (logits.argmax(-1) == target).sum().item()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                         reduction="sum").item()
    return float(correct), float(ce), target.numel()


def codebook_usage(counts: Tensor) -> float:
    """Fraction of the Q codes used at least once; counts: (Q,) histogram."""
    return float((counts > 0).sum().item() / counts.numel())


def codebook_entropy(counts: Tensor) -> float:
    """Entropy in bits of the empirical code distribution of a (Q,) histogram."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum().item())


class TokenAccumulator:
    """Streams token metrics over batches.

    update_step1(logits B×N×V, teacher_ids B×N); update_codes(ids B×K); result() ->
    {'token_top1', 'token_ce', 'codebook_usage', 'codebook_entropy'} (only the parts fed).
    """

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.long)
        self.correct = self.ce = 0.0
        self.n = 0

    def update_step1(self, logits: Tensor, teacher_ids: Tensor) -> None:
        c, ce, n = step1_token_sums(logits, teacher_ids)
        self.correct += c
        self.ce += ce
        self.n += n

    def update_codes(self, ids: Tensor) -> None:
        ids = ids.detach().reshape(-1).cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.counts.numel()):
            raise ValueError(f"token ids outside [0, {self.counts.numel()})")
        self.counts += torch.bincount(ids, minlength=self.counts.numel())

    def merge(self, other: TokenAccumulator) -> None:
        """Add another accumulator's sums (another rank's images)."""
        self.counts += other.counts
        self.correct += other.correct
        self.ce += other.ce
        self.n += other.n

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.n:
            out["token_top1"] = self.correct / self.n
            out["token_ce"] = self.ce / self.n
        if self.counts.sum() > 0:
            out["codebook_usage"] = codebook_usage(self.counts)
            out["codebook_entropy"] = codebook_entropy(self.counts)
        return out
