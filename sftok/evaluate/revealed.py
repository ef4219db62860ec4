"""The information revealed tokens give the decoder (issue 20; paper §3.2).

The paper's argument for multi-step decoding (Section 3.2): predicting the masked tokens of M_g
given the latent tokens z *and* already-predicted tokens lowers the minimum loss by the
conditional mutual information I(m_i ; M_revealed | z). No released code measures it; this
module estimates it for a trained decoder on held-out images.

For each image, with N proxy positions, g = the teacher ids M_g (B×N), and for each fraction r
a uniformly drawn set R of round(N·r) positions (clamped to [1, N-1], so something is revealed
and something stays masked; R is the same for every kind below):

- `ce_none`: the decoder's cross-entropy −log p(g_i | z) at the positions i ∉ R with every
  position masked (inference step 1),
- `ce_gt`: the same positions with the ground-truth ids g revealed at R,
- `ce_self`: the same positions with the model's own step-1 argmax M̂_1 revealed at R (what SFVR
  feeds the decoder, and what multi-step decoding at τ = 0 actually reveals: ids that are a
  function of z),

each per masked token, in nats, averaged over every masked position of every image. Their
differences `info_gt = ce_none − ce_gt` and `info_self = ce_none − ce_self` estimate the
information (nats per masked token) that the revealed tokens give the decoder: `info_gt`, the
paper's I(m_i ; M_R | z) as far as this decoder can use it (a difference of two cross-entropies,
each an upper bound on its conditional entropy, so an estimate and not a bound); `info_self`,
what its own predictions give it (M̂_1 carries no information about M_g beyond z, so any gain is
the decoder using them as a computational hint; a negative value means they mislead it).

Metric names (`sftok.run_record.reveal_metric`, `REVEAL_KINDS` × fractions):
`reveal_<kind>_r<100·r>`, e.g. `reveal_info_gt_r50`, `reveal_ce_none_r25`; `evaluate()` reports
them whenever it runs the trace.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sftok.data.seeding import generator, mix
from sftok.run_record import REVEAL_KINDS, reveal_metric

def reveal_count(num_positions: int, fraction: float) -> int:
    """round(N·r) clamped to [1, N−1]: at least one position revealed and one left masked."""
    return min(max(round(num_positions * fraction), 1), num_positions - 1)


def reveal_mask(num_positions: int, fraction: float, seeds: Sequence[int], device=None
                ) -> Tensor:
    """len(seeds)×N bool, True = revealed: per row exactly `reveal_count(N, r)` uniformly drawn
    positions, drawn from a CPU generator seeded with that row's seed (so an image's set depends
    on its seed alone: not on the batching, nor on the device)."""
    k = reveal_count(num_positions, fraction)
    out = torch.zeros(len(seeds), num_positions, dtype=torch.bool)
    for row, seed in enumerate(seeds):
        perm = torch.randperm(num_positions, generator=generator(seed))
        out[row, perm[:k]] = True
    return out.to(device)


def _ce(logits: Tensor, gt: Tensor) -> Tensor:
    """Per-position cross-entropy B×N (nats) of logits B×N×V against ids B×N, in float64: its
    sums must not depend on how the images are batched (as token_ce's do not)."""
    return F.cross_entropy(logits.double().transpose(1, 2), gt, reduction="none")


class RevealAccumulator:
    """Sums of the per-masked-token cross-entropies of `ce_none`, `ce_gt`, `ce_self` per
    fraction, over batches; `result()` gives every `reveal_<kind>_r<pct>` metric.

    update(logits_fn, gt, mask_id, first=None): logits_fn(proxy_ids B×N, `mask_id` at masked
    positions) -> logits B×N×V (e.g. `lambda ids: tokenizer.decoder_logits(ids, z_q)`); gt:
    B×N ids; first: the global index of the batch's first image (default: the images seen so
    far). The revealed set of image j at the f-th fraction is drawn from mix(seed, j, f): the
    result does not depend on how the images are batched, nor, with `first` and `merge`, on
    how they are sharded over ranks.
    """

    def __init__(self, fractions: Sequence[float], seed: int = 0):
        bad = [r for r in fractions if not 0.0 < r < 1.0]
        if bad:
            raise ValueError(f"reveal fractions must be in (0, 1), got {bad}")
        self.fractions = tuple(fractions)
        self.seed = seed
        self.images = 0
        self.sums = {r: dict.fromkeys(("ce_none", "ce_gt", "ce_self"), 0.0)
                     for r in self.fractions}
        self.counts = dict.fromkeys(self.fractions, 0)

    @torch.no_grad()
    def update(self, logits_fn: Callable[[Tensor], Tensor], gt: Tensor, mask_id: int,
               first: int | None = None) -> None:
        first = self.images if first is None else first
        gt = gt.long()
        b, n = gt.shape
        masked_all = torch.full_like(gt, mask_id)
        logits_none = logits_fn(masked_all)  # inference step 1: B×N×V
        ce_none = _ce(logits_none, gt)
        step1 = logits_none.argmax(-1)  # M̂_1, B×N
        for f, r in enumerate(self.fractions):
            seeds = [mix(self.seed, first + j, f) for j in range(b)]
            revealed = reveal_mask(n, r, seeds, gt.device)
            hidden = (~revealed).float()
            sums = self.sums[r]
            sums["ce_none"] += float((ce_none * hidden).sum())
            for kind, ids in (("ce_gt", gt), ("ce_self", step1)):
                proxy = torch.where(revealed, ids, masked_all)
                sums[kind] += float((_ce(logits_fn(proxy), gt) * hidden).sum())
            self.counts[r] += int(hidden.sum())
        self.images += b

    def merge(self, other: RevealAccumulator) -> None:
        """Add another accumulator's sums (another rank's images)."""
        for r in self.fractions:
            for k, v in other.sums[r].items():
                self.sums[r][k] += v
            self.counts[r] += other.counts[r]
        self.images += other.images

    def result(self) -> dict[str, float]:
        out = {}
        for r in self.fractions:
            if not self.counts[r]:
                continue
            mean = {k: v / self.counts[r] for k, v in self.sums[r].items()}
            mean["info_gt"] = mean["ce_none"] - mean["ce_gt"]
            mean["info_self"] = mean["ce_none"] - mean["ce_self"]
            out.update({reveal_metric(k, r): mean[k] for k in REVEAL_KINDS})
        return out


__all__ = ["RevealAccumulator", "reveal_count", "reveal_mask"]
