"""The revealed-token information (sftok.evaluate.revealed) on constructed decoders whose
answer is known in closed form, and its place in evaluate()."""
from __future__ import annotations

import math

import pytest
import torch
from test_eval_helpers import FakeTeacher, FakeTokenizer, batches, fake_images

from sftok.config import EvalConfig
from sftok.evaluate import evaluate
from sftok.evaluate.revealed import RevealAccumulator, reveal_count, reveal_mask
from sftok.run_record import REVEAL_KINDS, parse_reveal_metric, reveal_metric

V, N, MASK = 8, 16, 8
A = 3.0  # the copying decoder's logit for the id it copies


def copying_decoder(ids: torch.Tensor) -> torch.Tensor:
    """An image is one id repeated; this decoder knows it. Nothing visible: uniform over V;
    anything visible: logit A on the first visible id at every position, 0 elsewhere."""
    b, n = ids.shape
    logits = torch.zeros(b, n, V)
    visible = ids != MASK
    for i in range(b):
        if visible[i].any():
            logits[i, :, ids[i][visible[i]][0]] = A
    return logits


def constant_images(batch: int, seed: int = 0) -> torch.Tensor:
    c = torch.randint(0, V, (batch, 1), generator=torch.Generator().manual_seed(seed))
    return c.expand(batch, N).clone()


def test_copying_decoder_gives_the_closed_form_information():
    gt = constant_images(12)
    acc = RevealAccumulator((0.25, 0.5))
    acc.update(copying_decoder, gt, MASK)
    m = acc.result()
    p_right = math.exp(A) / (math.exp(A) + V - 1)
    p_wrong = 1 / (math.exp(A) + V - 1)
    # M̂_1 = argmax of uniform logits = id 0: revealing it copies 0, right only where g = 0.
    share0 = float((gt[:, 0] == 0).float().mean())
    for r in (0.25, 0.5):
        assert m[reveal_metric("ce_none", r)] == pytest.approx(math.log(V), abs=1e-6)
        assert m[reveal_metric("ce_gt", r)] == pytest.approx(-math.log(p_right), abs=1e-6)
        assert m[reveal_metric("info_gt", r)] == pytest.approx(math.log(V) + math.log(p_right),
                                                               abs=1e-6)
        want_self = -(share0 * math.log(p_right) + (1 - share0) * math.log(p_wrong))
        assert m[reveal_metric("ce_self", r)] == pytest.approx(want_self, abs=1e-5)
        assert m[reveal_metric("info_self", r)] == pytest.approx(math.log(V) - want_self,
                                                                 abs=1e-5)
    assert sorted(m) == sorted(reveal_metric(k, r) for k in REVEAL_KINDS for r in (0.25, 0.5))


def test_a_decoder_that_ignores_revealed_ids_gets_no_information():
    table = torch.randn(N, V, generator=torch.Generator().manual_seed(1))

    def blind(ids: torch.Tensor) -> torch.Tensor:  # depends on the position only
        return table.expand(ids.shape[0], N, V)

    gt = torch.randint(0, V, (9, N), generator=torch.Generator().manual_seed(2))
    acc = RevealAccumulator((0.25, 0.75))
    acc.update(blind, gt[:4], MASK)
    acc.update(blind, gt[4:], MASK)  # streaming over batches
    m = acc.result()
    for r in (0.25, 0.75):
        assert m[reveal_metric("info_gt", r)] == 0.0
        assert m[reveal_metric("info_self", r)] == 0.0
        assert m[reveal_metric("ce_none", r)] > 0


def test_ce_is_averaged_over_the_positions_left_masked_only():
    # A decoder that is perfect on revealed positions would lower a mean over *all* positions;
    # one that is told the truth only at revealed positions must not gain anything here.
    def echo(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(ids.shape[0], N, V)
        vis = ids != MASK
        logits[vis] = torch.nn.functional.one_hot(ids[vis], V).float() * 50
        return logits

    gt = torch.randint(0, V, (6, N), generator=torch.Generator().manual_seed(3))
    acc = RevealAccumulator((0.5,))
    acc.update(echo, gt, MASK)
    m = acc.result()
    assert m["reveal_info_gt_r50"] == pytest.approx(0.0, abs=1e-6)
    assert m["reveal_ce_gt_r50"] == pytest.approx(math.log(V), abs=1e-6)


def test_reveal_mask_counts_and_determinism():
    m = reveal_mask(N, 0.25, [10, 11, 12, 13, 14])
    assert m.dtype == torch.bool and m.shape == (5, N)
    assert (m.sum(1) == 4).all()
    assert len({tuple(row.tolist()) for row in m}) > 1  # drawn per row
    assert torch.equal(reveal_mask(N, 0.25, [12]), m[2:3])  # a row depends on its seed alone
    assert reveal_count(N, 0.01) == 1 and reveal_count(N, 0.99) == N - 1  # never 0 or N
    assert reveal_count(4, 0.5) == 2


def test_the_result_does_not_depend_on_the_batching():
    gt = torch.randint(0, V, (10, N), generator=torch.Generator().manual_seed(4))
    one, split = RevealAccumulator((0.5,), seed=3), RevealAccumulator((0.5,), seed=3)
    one.update(copying_decoder, gt, MASK)
    for part in (gt[:3], gt[3:4], gt[4:]):
        split.update(copying_decoder, part, MASK)
    assert split.result() == pytest.approx(one.result(), abs=1e-6)
    other = RevealAccumulator((0.5,), seed=4)
    other.update(copying_decoder, gt, MASK)
    assert other.result() != one.result()  # the seed draws the revealed sets


def test_sharded_over_ranks_and_merged_equals_one_pass():
    """Evaluation deals batches to ranks (rank 0: batches 0 and 2, rank 1: batch 1): with each
    batch's global first image index the draws, and so the merged result, are those of one
    process; without it rank 1 would redraw image 0's sets for its first image."""
    gt = torch.randint(0, V, (10, N), generator=torch.Generator().manual_seed(5))
    one = RevealAccumulator((0.25, 0.5), seed=3)
    one.update(copying_decoder, gt, MASK)
    rank0, rank1 = RevealAccumulator((0.25, 0.5), seed=3), RevealAccumulator((0.25, 0.5), seed=3)
    rank0.update(copying_decoder, gt[:4], MASK, first=0)
    rank1.update(copying_decoder, gt[4:6], MASK, first=4)
    rank0.update(copying_decoder, gt[6:], MASK, first=6)
    rank0.merge(rank1)
    assert rank0.images == 10 and rank0.counts == one.counts
    assert rank0.result() == pytest.approx(one.result(), abs=1e-6)
    unnumbered = RevealAccumulator((0.25, 0.5), seed=3)
    unnumbered.update(copying_decoder, gt[4:6], MASK)  # drawn as if they were images 0-1
    assert unnumbered.sums != rank1.sums


def test_bad_fractions_and_names_fail_clearly():
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        RevealAccumulator((0.5, 1.0))
    with pytest.raises(ValueError, match="unknown reveal kind"):
        reveal_metric("info", 0.5)
    for kind in REVEAL_KINDS:
        assert parse_reveal_metric(reveal_metric(kind, 0.25)) == (kind, 0.25)
    assert parse_reveal_metric("reveal_info_r50") is None
    assert parse_reveal_metric("psnr_s8") is None


def test_evaluate_reports_it_with_the_trace_and_not_without():
    x = fake_images(10)
    base = {"decode_steps": (1, 2), "batch_size": 4, "grid_images": 0, "seed": 0,
            "metrics": ("psnr",)}
    with_trace = evaluate(FakeTokenizer(), FakeTeacher(), batches(x, 5),
                          EvalConfig(trace_steps=2, **base), progress=False).metrics
    names = {reveal_metric(k, r) for k in REVEAL_KINDS for r in (0.25, 0.5, 0.75)}
    assert names <= set(with_trace)
    for r in (25, 50, 75):
        assert with_trace[f"reveal_info_gt_r{r}"] == pytest.approx(
            with_trace[f"reveal_ce_none_r{r}"] - with_trace[f"reveal_ce_gt_r{r}"])
    again = evaluate(FakeTokenizer(), FakeTeacher(), batches(x, 3),
                     EvalConfig(trace_steps=2, **base), progress=False).metrics
    assert {k: again[k] for k in names} == pytest.approx({k: with_trace[k] for k in names})
    without = evaluate(FakeTokenizer(), FakeTeacher(), batches(x, 5),
                       EvalConfig(trace_steps=0, **base), progress=False).metrics
    assert not any(k.startswith("reveal_") for k in without)
    off = evaluate(FakeTokenizer(), FakeTeacher(), batches(x, 5),
                   EvalConfig(trace_steps=2, reveal_fractions=(), **base), progress=False).metrics
    assert not any(k.startswith("reveal_") for k in off)
