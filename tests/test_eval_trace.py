"""Figure-4a trace: invariants on real decode traces, and a hand-computed example."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sftok.config import DecodeConfig
from sftok.decoding import decode
from sftok.evaluate.trace import TRACE_COLUMNS, TraceAccumulator, compute_trace

B, N, V = 3, 16, 10


def _decode(steps: int, seed: int = 0, temperature: float = 0.0, batch: int = B):
    g = torch.Generator().manual_seed(seed)
    table = 2 * torch.randn(V + 1, N, V, generator=g)  # logits depend on the id at each position

    def logits_fn(ids):
        base = table[ids, torch.arange(N)]  # B×N×V
        return base + 0.3 * table[ids.roll(1, dims=1), torch.arange(N)]

    gt = torch.randint(0, V, (batch, N), generator=g)
    res = decode(logits_fn, batch, N, V, DecodeConfig(steps=steps, temperature=temperature),
                 generator=torch.Generator().manual_seed(seed + 1), trace=True)
    return res, gt


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_trace_invariants(steps):
    res, gt = _decode(steps)
    rows = compute_trace(res.trace, gt)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(tuple(r) == TRACE_COLUMNS for r in rows)
    assert sum(r["num_fixed"] for r in rows) == pytest.approx(N)  # every position fixed once
    last = rows[-1]
    assert last["kl_final_all"] == pytest.approx(0.0, abs=1e-6)  # KL(p_S || p_S) = 0
    assert last["kl_final_masked"] == pytest.approx(0.0, abs=1e-6)
    assert last["top1_final_all"] == 1.0 and last["top1_final_masked"] == 1.0  # argmax p_S vs itself
    for r in rows:
        for k in ("kl_gt_all", "kl_gt_masked", "kl_final_all", "kl_final_masked"):
            assert r[k] >= 0.0
        for k in ("top1_gt_all", "top1_gt_masked", "top1_final_all", "top1_final_masked"):
            assert 0.0 <= r[k] <= 1.0
    # step 1 starts all-masked: the masked and all-position averages coincide
    assert rows[0]["kl_gt_all"] == pytest.approx(rows[0]["kl_gt_masked"])
    assert rows[0]["top1_final_all"] == pytest.approx(rows[0]["top1_final_masked"])


def test_trace_hand_computed():
    # one image, N = 2, V = 2, S = 2. Step 1: both masked; step 2: position 1 still masked.
    p1 = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    p2 = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    steps = [
        SimpleNamespace(logits=p1.log()[None], masked_before=torch.tensor([[True, True]]),
                        fixed_now=torch.tensor([[True, False]]), ids_after=torch.tensor([[0, 2]])),
        SimpleNamespace(logits=p2.log()[None], masked_before=torch.tensor([[False, True]]),
                        fixed_now=torch.tensor([[False, True]]), ids_after=torch.tensor([[0, 1]])),
    ]
    gt = torch.tensor([[1, 1]])
    r1, r2 = compute_trace(steps, gt)
    kl_gt_1 = [-math.log(0.5), -math.log(0.2)]
    assert r1["kl_gt_all"] == pytest.approx(sum(kl_gt_1) / 2)
    assert r1["kl_gt_masked"] == pytest.approx(sum(kl_gt_1) / 2)
    kl_f_pos1 = 0.25 * math.log(0.25 / 0.8) + 0.75 * math.log(0.75 / 0.2)
    assert r1["kl_final_all"] == pytest.approx(kl_f_pos1 / 2)  # position 0 has p1 == p2
    # argmax p1 = [0 (tie -> first), 0]; gt = [1, 1]; final prediction argmax p2 = [0, 1]
    assert r1["top1_gt_all"] == 0.0 and r1["top1_final_all"] == 0.5
    assert r2["kl_gt_masked"] == pytest.approx(-math.log(0.75))
    assert r2["kl_gt_all"] == pytest.approx((-math.log(0.5) - math.log(0.75)) / 2)
    assert r2["top1_gt_masked"] == 1.0 and r2["top1_final_all"] == 1.0
    assert r2["kl_final_all"] == 0.0
    assert (r1["num_fixed"], r2["num_fixed"]) == (1.0, 1.0)


def test_trace_streams_over_batches():
    # Different batches of different sizes: pooling must weight by positions, i.e. equal the
    # trace of the concatenated batch (an average of per-batch means would not).
    res_a, gt_a = _decode(4, seed=0, batch=2)
    res_b, gt_b = _decode(4, seed=1, batch=3)
    acc = TraceAccumulator()
    acc.update(res_a.trace, gt_a)
    acc.update(res_b.trace, gt_b)
    joined = [SimpleNamespace(**{f: torch.cat([getattr(sa, f), getattr(sb, f)])
                                 for f in ("logits", "masked_before", "fixed_now", "ids_after")})
              for sa, sb in zip(res_a.trace, res_b.trace)]
    for r_pooled, r_one in zip(acc.rows(), compute_trace(joined, torch.cat([gt_a, gt_b]))):
        for k in TRACE_COLUMNS:
            assert r_pooled[k] == pytest.approx(r_one[k])
    with pytest.raises(ValueError):
        acc.update(_decode(2)[0].trace, gt_a)
