"""The Figure-4a per-step trace (DESIGN §1 'Analyses the paper reports').

For each step i = 1..S of an S-step decode, with p_i = softmax(logits_i) the step-i predictive
distribution (B×N×V), g = the teacher's ids M_g (B×N) and the final prediction p_S with its
top-1 ids M̂_S = argmax p_S, over all N positions ("_all") and over the positions still
masked when step i started ("_masked", `StepTrace.masked_before`):

- kl_gt      = −log p_i[g]          (KL from the one-hot ground truth to p_i, nats)
- kl_final   = KL(p_S ‖ p_i)        (to the final prediction; exactly 0 at i = S)
- top1_gt    = [argmax p_i == g]
- top1_final = [argmax p_i == argmax p_S]  (exactly 1 at i = S). The final *prediction*, not
  the decoded ids: positions fixed at earlier steps keep ids that p_S may no longer rank
  first, and measuring against p_S keeps top-1 consistent with the KL column.
- num_fixed  = positions fixed at step i, per image (sums to N over the S steps)

Aggregation: sums over every position of every image divided by the matching count, i.e. the
mean over images of the per-image means (every image has the same number of masked positions
per step). Streaming: `TraceAccumulator` keeps only per-step sums.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TRACE_COLUMNS = ("step", "kl_gt_all", "kl_gt_masked", "kl_final_all", "kl_final_masked",
                 "top1_gt_all", "top1_gt_masked", "top1_final_all", "top1_final_masked",
                 "num_fixed")
_SUMS = ("kl_gt", "kl_final", "top1_gt", "top1_final")


class TraceAccumulator:
    """update(trace: S StepTrace-like objects, gt B×N) per batch;
    rows() -> S dicts with TRACE_COLUMNS (step is 1-based)."""

    def __init__(self):
        self.steps: int | None = None
        self.sums: list[dict[str, float]] = []
        self.images = 0

    @torch.no_grad()
    def update(self, trace: Sequence, gt: Tensor) -> None:
        if not trace:
            raise ValueError("TraceAccumulator.update: empty trace (decode with trace=True)")
        if self.steps is None:
            self.steps = len(trace)
            self.sums = [dict.fromkeys([f"{k}_{w}" for k in _SUMS for w in ("all", "masked")]
                                       + ["n_all", "n_masked", "fixed"], 0.0)
                         for _ in range(self.steps)]
        elif len(trace) != self.steps:
            raise ValueError(f"trace has {len(trace)} steps, earlier batches had {self.steps}")
        gt = gt.long()
        logp_final = torch.log_softmax(trace[-1].logits.float(), dim=-1)  # B×N×V
        p_final = logp_final.exp()
        final_pred = logp_final.argmax(-1)  # B×N
        for i, st in enumerate(trace):
            logp = torch.log_softmax(st.logits.float(), dim=-1)  # B×N×V
            per_pos = {
                "kl_gt": -logp.gather(-1, gt[..., None]).squeeze(-1),
                # KL(p_S‖p_i) = Σ_v p_S (log p_S − log p_i); xlogy-style 0·log0 = 0 via p_final
                "kl_final": (p_final * (logp_final - logp)).sum(-1).clamp_min(0.0),
                "top1_gt": (logp.argmax(-1) == gt).float(),
                "top1_final": (logp.argmax(-1) == final_pred).float(),
            }
            masked = st.masked_before.bool()
            acc = self.sums[i]
            for k, v in per_pos.items():
                acc[f"{k}_all"] += v.double().sum().item()
                acc[f"{k}_masked"] += v.double()[masked].sum().item()
            acc["n_all"] += gt.numel()
            acc["n_masked"] += masked.sum().item()
            acc["fixed"] += st.fixed_now.sum().item()
        self.images += gt.shape[0]

    def merge(self, other: TraceAccumulator) -> None:
        """Add another accumulator's sums (another rank's images)."""
        if other.steps is None:
            return
        if self.steps is None:
            self.steps, self.sums = other.steps, [dict(acc) for acc in other.sums]
        elif other.steps != self.steps:
            raise ValueError(f"trace has {other.steps} steps, earlier batches had {self.steps}")
        else:
            for mine, theirs in zip(self.sums, other.sums):
                for k, v in theirs.items():
                    mine[k] += v
        self.images += other.images

    def rows(self) -> list[dict]:
        out = []
        for i, acc in enumerate(self.sums):
            row: dict = {"step": i + 1}
            for k in _SUMS:
                row[f"{k}_all"] = acc[f"{k}_all"] / acc["n_all"] if acc["n_all"] else float("nan")
                row[f"{k}_masked"] = (acc[f"{k}_masked"] / acc["n_masked"] if acc["n_masked"]
                                      else float("nan"))
            row["num_fixed"] = acc["fixed"] / self.images
            out.append({c: row[c] for c in TRACE_COLUMNS})
        return out


def compute_trace(trace: Sequence, gt: Tensor) -> list[dict]:
    """The trace rows of one decode (see module docstring)."""
    acc = TraceAccumulator()
    acc.update(trace, gt)
    return acc.rows()
