"""Invariants of the mask schedules and the multi-step decode loop (DESIGN §1 'Inference')."""
from __future__ import annotations

import math

import pytest
import torch

from sftok.config import DecodeConfig
from sftok.decoding import decode
from sftok.schedules import (
    SCHEDULES,
    decode_schedule,
    keep_masked,
    mask_fraction,
    random_mask,
    train_mask_counts,
)

B, V = 3, 32
MASK = V


def fixed_logits_fn(batch: int, n: int, seed: int = 0):
    """Ignores its input: the same random logits every step."""
    logits = torch.randn(batch, n, V, generator=torch.Generator().manual_seed(seed))
    return (lambda ids: logits), logits


def input_dependent_logits_fn(batch: int, n: int, seed: int = 0):
    """Logits that depend on every visible id (continuous, so no ties in practice)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, n, V, generator=g)
    emb = torch.randn(V + 1, V, generator=g)  # row V = mask id

    def fn(ids: torch.Tensor) -> torch.Tensor:
        assert ids.dtype == torch.long and ids.shape == (batch, n)
        ctx = emb[ids]  # B×N×V
        return base + 0.5 * ctx.mean(1, keepdim=True) + 0.3 * ctx.roll(1, dims=1)

    return fn


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_mask_fraction_endpoints_and_monotone(name):
    assert mask_fraction(name, 0.0) == pytest.approx(1.0, abs=1e-12)
    assert mask_fraction(name, 1.0) == pytest.approx(0.0, abs=1e-12)
    r = torch.linspace(0, 1, 1001, dtype=torch.float64)
    f = mask_fraction(name, r)
    assert isinstance(f, torch.Tensor) and f.shape == r.shape
    assert (f.diff() <= 1e-12).all()
    assert ((f >= -1e-12) & (f <= 1 + 1e-12)).all()
    # float and tensor paths agree
    for x in (0.1, 0.37, 0.5, 0.9):
        as_tensor = mask_fraction(name, torch.tensor(x, dtype=torch.float64))
        assert mask_fraction(name, x) == pytest.approx(float(as_tensor))


def test_mask_fraction_formulas_and_errors():
    assert mask_fraction("arccos", 0.5) == pytest.approx(2 / 3)  # arccos(1/2) = pi/3
    assert mask_fraction("cosine", 0.5) == pytest.approx(math.sqrt(0.5))
    assert mask_fraction("linear", 0.25) == pytest.approx(0.75)
    assert mask_fraction("square", 0.5) == pytest.approx(0.75)
    assert mask_fraction("sqrt", 0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        mask_fraction("nope", 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_fraction("linear", 1.5)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n", [16, 64, 256])
def test_decode_schedule(name, steps, n):
    counts = decode_schedule(name, n, steps)
    assert len(counts) == steps and counts[-1] == 0
    prev = n
    for s, c in enumerate(counts[:-1]):
        r = (s + 1) / steps
        assert c == max(1, min(prev - 1, math.floor(n * mask_fraction(name, r))))
        # Every step fixes at least one position while more than one is masked (a schedule that
        # reaches 1 early, e.g. sqrt with N = S, then waits for the last step).
        assert c >= 1 and (c < prev or prev == 1)
        prev = c


def test_keep_masked_matches_reference_arccos_256():
    # GOLDEN_README item 5: floor(256 * arccos(r) / (pi/2)), clamped to [1, #masked - 1].
    for steps in (4, 8):
        prev = 256
        for s in range(steps - 1):
            target = math.floor(256 * math.acos((s + 1) / steps) / (math.pi / 2))
            expect = max(1, min(prev - 1, target))
            got = keep_masked("arccos", 256, s, steps, prev)
            assert got == expect
            prev = got
    # floor(256 · {0.839, 0.667, 0.460})
    assert decode_schedule("arccos", 256, 4) == [214, 170, 117, 0]
    with pytest.raises(ValueError):
        keep_masked("arccos", 256, 4, 4, 10)
    with pytest.raises(ValueError):
        decode_schedule("arccos", 256, 0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_train_mask_counts_and_random_mask(name):
    n, batch = 64, 500
    t = torch.tensor([0.0, 1.0, 0.5])
    c = train_mask_counts(name, t, n)
    assert c.tolist() == [n, 1, max(1, round(n * mask_fraction(name, 0.5)))]

    m = random_mask(batch, n, name, generator=torch.Generator().manual_seed(3))
    assert m.dtype == torch.bool and m.shape == (batch, n)
    # Same draws as random_mask: t first, then the permutation uniforms.
    t = torch.rand(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m.sum(1), train_mask_counts(name, t, n))
    assert (m.sum(1) >= 1).all()
    # Positions are spread out (not always the first ones): every position masked sometimes.
    assert m.any(0).all()
    # Deterministic under a seed, different under another.
    assert torch.equal(m, random_mask(batch, n, name, generator=torch.Generator().manual_seed(3)))
    other = random_mask(batch, n, name, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(m, other)


# --------------------------------------------------------------------------------------------
# Decode loop
# --------------------------------------------------------------------------------------------

MODES = {
    "argmax": DecodeConfig(temperature=0.0),
    "sampled": DecodeConfig(temperature=2.0, confidence_noise=1.0),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n", [16, 64, 256])
def test_decode_invariants(mode, steps, n):
    cfg = DecodeConfig(steps=steps, temperature=MODES[mode].temperature,
                       confidence_noise=MODES[mode].confidence_noise)
    fn = input_dependent_logits_fn(B, n)
    res = decode(fn, B, n, MASK, cfg, generator=torch.Generator().manual_seed(0), trace=True)

    assert res.ids.shape == (B, n) and res.ids.dtype == torch.long
    assert not (res.ids == MASK).any() and ((res.ids >= 0) & (res.ids < V)).all()
    assert res.last_logits.shape == (B, n, V)
    assert len(res.trace) == steps
    assert torch.equal(res.trace[-1].logits, res.last_logits.float())

    counts = decode_schedule(cfg.schedule, n, steps)
    fixed_total = torch.zeros(B, n, dtype=torch.long)
    masked = torch.ones(B, n, dtype=torch.bool)
    ids = torch.full((B, n), MASK)
    prev = n
    for s, st in enumerate(res.trace):
        assert st.logits.shape == (B, n, V) and st.logits.dtype == torch.float32
        for t in (st.masked_before, st.fixed_now):
            assert t.shape == (B, n) and t.dtype == torch.bool
        assert st.ids_after.shape == (B, n) and st.ids_after.dtype == torch.long
        assert torch.equal(st.masked_before, masked)
        assert not (st.fixed_now & ~st.masked_before).any()  # only masked positions get fixed
        # Exact per-sample count from the schedule.
        assert st.fixed_now.sum(1).tolist() == [prev - counts[s]] * B
        # Ids fixed earlier never change; mask id exactly where still masked.
        assert torch.equal(st.ids_after[~masked], ids[~masked])
        masked = masked & ~st.fixed_now
        assert torch.equal(st.ids_after == MASK, masked)
        # Newly fixed ids: argmax of this step's logits at temperature 0.
        if mode == "argmax":
            am = st.logits.argmax(-1)
            assert torch.equal(st.ids_after[st.fixed_now], am[st.fixed_now])
        fixed_total += st.fixed_now.long()
        ids, prev = st.ids_after, counts[s]
    assert (fixed_total == 1).all()  # the fixed_now masks partition the positions
    assert torch.equal(ids, res.ids)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_temperature_zero_is_deterministic_argmax(steps):
    fn, logits = fixed_logits_fn(B, 64)
    cfg = DecodeConfig(steps=steps, temperature=0.0)
    a = decode(fn, B, 64, MASK, cfg)
    b = decode(fn, B, 64, MASK, cfg, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a.ids, logits.argmax(-1))
    assert torch.equal(a.ids, b.ids)
    assert a.trace is None


def test_one_step_fixes_everything():
    fn, logits = fixed_logits_fn(B, 16)
    res = decode(fn, B, 16, MASK, DecodeConfig(steps=1), trace=True)
    assert res.trace[0].fixed_now.all() and res.trace[0].masked_before.all()
    assert torch.equal(res.ids, logits.argmax(-1))


def test_seeded_sampling_is_reproducible():
    fn = input_dependent_logits_fn(B, 64)
    cfg = DecodeConfig(steps=8, temperature=3.0, confidence_noise=1.0)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return decode(fn, B, 64, MASK, cfg, generator=g, trace=True)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.ids, b.ids)
    for ta, tb in zip(a.trace, b.trace):
        assert torch.equal(ta.fixed_now, tb.fixed_now)
    assert not torch.equal(a.ids, c.ids)


def test_confidence_noise_alone_changes_order_not_ids_of_fixed_logits():
    # With input-independent logits and tau = 0, confidence noise only changes *when* a position
    # is fixed, not *what* it is fixed to.
    fn, logits = fixed_logits_fn(B, 64)
    cfg = DecodeConfig(steps=8, temperature=0.0, confidence_noise=5.0)
    a = decode(fn, B, 64, MASK, cfg, generator=torch.Generator().manual_seed(0), trace=True)
    b = decode(fn, B, 64, MASK, cfg, generator=torch.Generator().manual_seed(1), trace=True)
    assert torch.equal(a.ids, logits.argmax(-1)) and torch.equal(b.ids, a.ids)
    assert any(not torch.equal(x.fixed_now, y.fixed_now) for x, y in zip(a.trace, b.trace))


def test_exact_counts_under_ties():
    # Constant logits: every confidence ties. The reference's `confidence <= cut_off` would
    # re-mask every position; ties are broken by position so each step still fixes exactly the
    # scheduled count (the lowest positions stay masked longest).
    n, steps = 64, 8
    def fn(ids):
        return torch.zeros(B, n, V)

    res = decode(fn, B, n, MASK, DecodeConfig(steps=steps), trace=True)
    counts = decode_schedule("arccos", n, steps)
    prev = n
    for st, c in zip(res.trace, counts):
        assert st.fixed_now.sum(1).tolist() == [prev - c] * B
        if c:
            assert (st.ids_after[:, :c] == MASK).all() and (st.ids_after[:, c:] != MASK).all()
        prev = c
    assert (res.ids == 0).all()


def _reference_rule_decode(fn, batch, n, steps):
    """GOLDEN_README item 5 written out literally (temperature 0, arccos, `<= cut_off`)."""
    ids = torch.full((batch, n), MASK)
    for s in range(steps):
        r = (s + 1) / steps
        is_mask = ids == MASK
        logits = fn(ids)
        sampled = logits.argmax(-1)
        conf = logits.gather(-1, sampled[..., None]).squeeze(-1)
        sampled = torch.where(is_mask, sampled, ids)
        conf = torch.where(is_mask, conf, torch.tensor(math.inf))
        target = math.floor(n * math.acos(r) / (math.pi / 2))
        mask_len = max(1, min(int(is_mask[0].sum()) - 1, target))
        cut_off = conf.sort(-1).values[:, mask_len - 1:mask_len]
        ids = sampled if s == steps - 1 else torch.where(conf <= cut_off, MASK, sampled)
    return ids, logits


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_matches_reference_rule_without_ties(steps):
    n = 256
    fn = input_dependent_logits_fn(2, n, seed=7)
    ref_ids, ref_logits = _reference_rule_decode(fn, 2, n, steps)
    res = decode(fn, 2, n, MASK, DecodeConfig(steps=steps))
    assert torch.equal(res.ids, ref_ids)
    assert torch.equal(res.last_logits, ref_logits)


def test_validation_errors():
    fn, _ = fixed_logits_fn(B, 16)
    with pytest.raises(ValueError, match="steps"):
        decode(fn, B, 16, MASK, DecodeConfig(steps=0))
    with pytest.raises(ValueError, match="temperature"):
        decode(fn, B, 16, MASK, DecodeConfig(temperature=-1.0))
    with pytest.raises(ValueError, match="confidence_noise"):
        decode(fn, B, 16, MASK, DecodeConfig(confidence_noise=-1.0))
    with pytest.raises(ValueError, match="schedule"):
        decode(fn, B, 16, MASK, DecodeConfig(schedule="bogus"))
    with pytest.raises(ValueError, match="mask_id"):
        decode(fn, B, 16, 5, DecodeConfig())
    with pytest.raises(ValueError, match="B×N×V"):
        decode(fn, B, 8, MASK, DecodeConfig())
    with pytest.raises(ValueError, match="batch"):
        decode(fn, 0, 16, MASK, DecodeConfig())


# --------------------------------------------------------------------------------------------
# Temperature: the paper's one knob (Table 6 "randomize temperature"), the reference's annealing
# --------------------------------------------------------------------------------------------


def _scripted_gumbel(monkeypatch, draws):
    """Replace the Gumbel source by scripted tensors (popped in call order); returns the log of
    the shapes that were asked for."""
    import sftok.decoding as dec

    asked = []

    def fake(shape, like, generator):
        asked.append(tuple(shape))
        out = torch.tensor(draws.pop(0), dtype=torch.float32)
        assert tuple(out.shape) == tuple(shape)
        return out

    monkeypatch.setattr(dec, "_gumbel", fake)
    return asked


def test_temperature_anneals_sampling_and_confidence_like_the_reference(monkeypatch):
    # Hand-computed, B=1, N=2, V=2, S=2, tau=1. Step 0: r=1/2, so both noises have scale 0.5.
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    asked = _scripted_gumbel(monkeypatch, [
        [[[0.0, 3.0], [0.0, 0.0]]],  # sampling noise: pos0 scores [2, 1.5] -> id 0 (at scale
                                     # 1.0, i.e. without annealing, [2, 3] would give id 1)
        [[1.2, 3.0]],                # confidence: raw logits [2, 1] + 0.5 * [1.2, 3] = [2.6, 2.5]
    ])
    res = decode(lambda ids: logits, 1, 2, 2, DecodeConfig(steps=2, temperature=1.0),
                 trace=True)
    # keep_masked(arccos, N=2, step 0 of 2) = 1: the least confident (pos1, 2.5) stays masked;
    # at scale 1.0 the confidences would be [3.2, 4.0] and pos0 would stay masked instead.
    assert res.trace[0].fixed_now.tolist() == [[True, False]]
    assert res.trace[0].ids_after.tolist() == [[0, 2]]
    # Step 1 (the last): r = 1, scale 0 -> argmax, no noise drawn.
    assert res.ids.tolist() == [[0, 1]]
    assert asked == [(1, 2, 2), (1, 2)]


def test_confidence_noise_override_is_separate(monkeypatch):
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    asked = _scripted_gumbel(monkeypatch, [[[[0.0, 3.0], [0.0, 0.0]]]])
    cfg = DecodeConfig(steps=2, temperature=1.0, confidence_noise=0.0)
    res = decode(lambda ids: logits, 1, 2, 2, cfg, trace=True)
    assert asked == [(1, 2, 2)]  # sampling noise only
    assert res.trace[0].fixed_now.tolist() == [[True, False]]  # raw confidences [2, 1]
    assert DecodeConfig(temperature=0.7).confidence_scale == 0.7
    assert DecodeConfig(temperature=0.7, confidence_noise=0.2).confidence_scale == 0.2


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_temperature_zero_draws_nothing_and_is_argmax(monkeypatch, steps):
    asked = _scripted_gumbel(monkeypatch, [])
    fn = input_dependent_logits_fn(2, 64, seed=3)
    res = decode(fn, 2, 64, MASK, DecodeConfig(steps=steps, temperature=0.0))
    ref_ids, _ = _reference_rule_decode(fn, 2, 64, steps)
    assert asked == [] and torch.equal(res.ids, ref_ids)
