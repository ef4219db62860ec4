"""Quantizer invariants: Sinkhorn marginals, assignment rules, losses, straight-through."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from sftok.config import QuantizerConfig
from sftok.quantizer import OptVQQuantizer, VectorQuantizer, build_quantizer, sinkhorn


def _cost(m=48, q=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, q, generator=g, dtype=torch.float64) * 2.0


def test_sinkhorn_marginals_converge():
    """Sinkhorn-Knopp: rows (samples) sum to 1 after every iteration (the last rescaling is per
    row); columns (codes) approach M/Q, the balanced marginal, as iterations grow."""
    cost = _cost()
    m, q = cost.shape
    col_err = []
    for iters in (1, 5, 50, 500):
        plan = sinkhorn(cost, iters=iters, epsilon=3.0)
        assert (plan > 0).all()
        # exact up to the reference's 1e-8 guard in the divisions (relative 1e-8 / (1/M))
        torch.testing.assert_close(plan.sum(1), torch.ones(m, dtype=plan.dtype), rtol=0, atol=1e-5)
        col_err.append((plan.sum(0) - m / q).abs().max().item())
    assert all(a >= b for a, b in itertools.pairwise(col_err)), col_err
    assert col_err[-1] < 1e-6 * m, col_err
    assert col_err[0] > 10 * col_err[-1]  # it really did need the iterations


def test_sinkhorn_balances_codes():
    """All samples prefer code 0 by a small margin: nearest-code piles everything there, the
    transport plan spreads samples over codes (why OptVQ uses it)."""
    m, q = 32, 8
    cost = torch.full((m, q), 0.5)
    cost[:, 0] = 0.45
    cost += 0.01 * torch.rand(m, q, generator=torch.Generator().manual_seed(1))
    assert cost.argmin(1).unique().numel() == 1
    ids = sinkhorn(cost, iters=50, epsilon=10.0).argmax(1)
    assert ids.unique().numel() == q


def _z(b=3, k=5, c=8, seed=0):
    return torch.randn(b, k, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["vq", "optvq"])
def test_straight_through_and_values(kind):
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind=kind, codebook_size=32), token_size=8).eval()
    z = _z().requires_grad_(True)
    out = q(z)
    # Value: the chosen normalised code; ids index the codebook.
    torch.testing.assert_close(out.z_q, q.codebook()[out.ids], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.z_q.norm(dim=-1), torch.ones(3, 5), rtol=0, atol=1e-5)
    # Gradient: that of the l2-normalised input, as if quantisation were the identity.
    w = torch.randn_like(out.z_q)
    (g_st,) = torch.autograd.grad((out.z_q * w).sum(), z)
    (g_ref,) = torch.autograd.grad((F.normalize(z, dim=-1) * w).sum(), z)
    torch.testing.assert_close(g_st, g_ref)


def test_vq_nearest_and_losses():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="vq", codebook_size=32, commitment=0.25)
    q = VectorQuantizer(cfg, token_size=8)
    z = _z().requires_grad_(True)
    out = q(z)
    zn = F.normalize(z, dim=-1)
    cos = zn @ q.codebook().t()  # unit vectors: nearest = largest cosine
    assert torch.equal(out.ids, cos.argmax(-1))
    code = q.codebook()[out.ids]
    mse = ((code - zn) ** 2).mean()
    torch.testing.assert_close(out.losses["commitment"], 0.25 * mse)
    torch.testing.assert_close(out.losses["codebook"], mse)
    torch.testing.assert_close(out.loss, 1.25 * mse)
    # commitment pulls only the encoder output, the codebook term only the codes.
    gz, ge = torch.autograd.grad(out.losses["commitment"], [z, q.embedding.weight],
                                 allow_unused=True, materialize_grads=True)
    assert gz.abs().sum() > 0 and ge.abs().sum() == 0
    gz, ge = torch.autograd.grad(out.losses["codebook"], [z, q.embedding.weight],
                                 allow_unused=True, materialize_grads=True)
    assert gz.abs().sum() == 0 and ge.abs().sum() > 0


def test_optvq_assignment_modes():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="optvq", codebook_size=16, assign_at_inference="nearest")
    q = OptVQQuantizer(cfg, token_size=8)
    with torch.no_grad():  # a non-identity shared linear, so the codebook really goes through it
        q.shared_linear.weight.add_(0.3 * torch.randn(8, 8))
    z = _z(b=4, k=6)
    zn = F.normalize(z, dim=-1).reshape(-1, 8)
    dist = torch.cdist(zn, q.codebook())
    nearest = dist.argmin(-1).view(4, 6)
    plan_ids = sinkhorn(dist - dist.min(), iters=5, epsilon=10.0).argmax(-1).view(4, 6)
    assert not torch.equal(nearest, plan_ids)  # the case is informative

    assert torch.equal(q.eval()(z).ids, nearest)
    assert torch.equal(q.train()(z).ids, plan_ids)  # training always uses Sinkhorn
    q_sk = OptVQQuantizer(dataclasses.replace(cfg, assign_at_inference="sinkhorn"), 8)
    q_sk.load_state_dict(q.state_dict())
    assert torch.equal(q_sk.eval()(z).ids, plan_ids)


def test_nearest_ids_do_not_depend_on_batch():
    torch.manual_seed(0)
    q = OptVQQuantizer(QuantizerConfig(codebook_size=16, assign_at_inference="nearest"), 8).eval()
    z = _z(b=6, k=5)
    together = q(z).ids
    alone = torch.cat([q(z[i:i + 1]).ids for i in range(6)])
    assert torch.equal(together, alone)
    # Sinkhorn over the batch: one image's ids change with its companions.
    q.cfg = dataclasses.replace(q.cfg, assign_at_inference="sinkhorn")
    together = q(z).ids
    alone = torch.cat([q(z[i:i + 1]).ids for i in range(6)])
    assert not torch.equal(together, alone)


@pytest.mark.parametrize("kind", ["vq", "optvq"])
@pytest.mark.parametrize("training", [True, False])
def test_quantizer_runs_in_float32_under_autocast(kind, training):
    # bf16 autocast must not reach the assignment: ids, z_q and losses equal the fp32 ones.
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(kind=kind, codebook_size=2048), token_size=32)
    q.train(training)
    z = torch.randn(8, 32, 32)
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert torch.equal(out.ids, ref.ids)
    assert out.z_q.dtype == torch.float32
    torch.testing.assert_close(out.z_q, ref.z_q)
    torch.testing.assert_close(out.loss, ref.loss)
