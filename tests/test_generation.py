"""Class-conditional generation (issue 12): guidance algebra, sampling invariants, masking and
loss, class balance, FID statistics, pre-tokenisation cache, generator training and scoring."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sftok.config import GeneratorModelConfig, SamplingConfig
from sftok.decoding import decode
from sftok.generation.guidance import GuidedLogits, combine, guidance_scale
from sftok.generation.masking import generator_loss, mask_tokens
from sftok.generation.model import MaskGITGenerator, drop_labels
from sftok.generation.sampling import (
    class_balanced_labels,
    sample_tokens,
    sampling_decode_config,
)

Q, C = 12, 5


def _gen(k: int = 8, seed: int = 0) -> MaskGITGenerator:
    torch.manual_seed(seed)
    cfg = GeneratorModelConfig(width=16, depth=1, heads=2, dropout=0.0)
    return MaskGITGenerator(cfg, num_codes=Q, num_tokens=k, num_classes=C).eval()


def _ids(b: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, Q, (b, k), generator=g)
    ids[:, ::3] = Q  # some masked positions
    return ids


# ---- guidance algebra -------------------------------------------------------------------------


def test_guidance_scale_zero_is_the_conditional_model_exactly():
    model, ids, labels = _gen(), _ids(3, 8), torch.tensor([0, 2, 4])
    fn = GuidedLogits(model, labels, SamplingConfig(guidance_scale=0.0, steps=4))
    with torch.no_grad():
        assert torch.equal(fn(ids), model(ids, labels))
    assert fn.scales == [0.0]


def test_batched_guided_forward_equals_two_separate_forwards():
    model, ids, labels = _gen(), _ids(3, 8), torch.tensor([1, 3, 0])
    s = 2.5
    fn = GuidedLogits(model, labels, SamplingConfig(guidance_scale=s, steps=4))
    with torch.no_grad():
        got = fn(ids)
        cond = model(ids, labels)
        uncond = model(ids, torch.full_like(labels, model.null_label))
    torch.testing.assert_close(got, cond + s * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond, uncond)  # the guidance term is not trivially zero


def test_linear_guidance_is_unguided_at_step_zero_then_s_k_over_S():
    model, ids, labels = _gen(), _ids(2, 8), torch.tensor([1, 2])
    cfg = SamplingConfig(guidance_scale=4.0, guidance_schedule="linear", steps=4)
    fn = GuidedLogits(model, labels, cfg)
    with torch.no_grad():
        assert torch.equal(fn(ids), model(ids, labels))
        for _ in range(3):
            fn(ids)
    assert fn.scales == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="fresh one per decode"):
        fn(ids)


def test_power_cosine_matches_the_released_uncond_form():
    cond, uncond = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    s, p, steps = 4.5, 3.0, 8
    for k in range(steps):
        w = (s - 1) * (1 - math.cos(math.pi * (k / steps) ** p)) / 2 + 1  # released form
        ref = uncond + w * (cond - uncond)
        got = combine(cond, uncond, guidance_scale("power-cosine", s, k, steps, p))
        torch.testing.assert_close(got, ref)
    assert guidance_scale("constant", s, 5, steps) == s
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        guidance_scale("cosine", s, 0, steps)


def test_null_class_output_does_not_depend_on_the_label():
    model, ids = _gen(), _ids(4, 8)
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, 0, 1])
    da = drop_labels(a, 1.0, model.null_label)
    db = drop_labels(b, 1.0, model.null_label)
    with torch.no_grad():
        assert torch.equal(model(ids, da), model(ids, db))
        assert not torch.equal(model(ids, a), model(ids, b))  # labels do matter otherwise
    assert torch.equal(drop_labels(a, 0.0, model.null_label), a)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\]"):
        model(ids, torch.tensor([0, 1, 2, 6]))


# ---- sampling ---------------------------------------------------------------------------------


def test_every_position_fixed_once_with_the_paper_counts_for_k64_s8():
    model = _gen(k=64)
    labels = torch.tensor([0, 3, 4])
    cfg = SamplingConfig(steps=8, temperature=1.0, guidance_scale=4.5)
    fn = GuidedLogits(model, labels, cfg)
    with torch.no_grad():
        res = decode(fn, 3, 64, model.mask_id, sampling_decode_config(cfg),
                     generator=torch.Generator().manual_seed(0), trace=True)
    counts = torch.stack([t.fixed_now.sum(1) for t in res.trace], 1)  # B×S
    assert counts.tolist() == [[6, 5, 5, 6, 6, 7, 9, 20]] * 3
    fixed = torch.stack([t.fixed_now for t in res.trace]).sum(0)  # B×K: times fixed
    assert bool((fixed == 1).all())
    assert int(res.ids.max()) < Q and int(res.ids.min()) >= 0


def test_tau_zero_is_deterministic_and_each_sample_independent_of_the_batch():
    model = _gen(k=16)
    cfg = SamplingConfig(steps=6, temperature=0.0, guidance_scale=2.0)
    labels = torch.tensor([0, 1, 2, 4])
    a = sample_tokens(model, labels, cfg, torch.Generator().manual_seed(0))
    b = sample_tokens(model, labels, cfg, torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    singles = torch.cat([sample_tokens(model, labels[i:i + 1], cfg) for i in range(4)])
    assert torch.equal(a, singles)
    # with tau > 0 the seed matters (the test above could fail)
    hot = dataclasses.replace(cfg, temperature=5.0)
    c = sample_tokens(model, labels, hot, torch.Generator().manual_seed(0))
    d = sample_tokens(model, labels, hot, torch.Generator().manual_seed(1))
    assert not torch.equal(c, d)


def test_class_balanced_labels_exactly_n_per_class():
    y = class_balanced_labels([7, 0, 3], 4)
    assert y.tolist() == [7] * 4 + [0] * 4 + [3] * 4
    assert torch.bincount(y).tolist()[0] == 4
    with pytest.raises(ValueError, match="per_class >= 1"):
        class_balanced_labels([1], 0)


# ---- training inputs and loss -------------------------------------------------------------------


def test_training_mask_counts_follow_arccos_with_at_least_one():
    b, k = 64, 16
    tokens = torch.randint(0, Q, (b, k))
    ids, masked = mask_tokens(tokens, Q, "arccos", torch.Generator().manual_seed(3))
    t = torch.rand(b, generator=torch.Generator().manual_seed(3))  # the same first draw
    expect = torch.round(k * torch.acos(t.double()) / (math.pi / 2)).long().clamp(1, k)
    assert masked.sum(1).tolist() == expect.tolist()
    assert bool((ids[masked] == Q).all()) and torch.equal(ids[~masked], tokens[~masked])


def test_loss_is_label_smoothed_ce_weighted_1_masked_01_visible():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 1.0], [0.0, 3.0, 0.0]]])  # 1×3×3
    targets = torch.tensor([[0, 2, 1]])
    masked = torch.tensor([[True, False, True]])
    out = generator_loss(logits, targets, masked, unmasked_weight=0.1, label_smoothing=0.1)
    per = F.cross_entropy(logits[0], targets[0], reduction="none", label_smoothing=0.1)
    expect = (per[0] + 0.1 * per[1] + per[2]) / 2.1
    torch.testing.assert_close(out.loss, expect)
    # label smoothing by hand: (1 - e) * nll + e * mean over classes of -log p
    logp = logits[0].log_softmax(-1)
    hand = 0.9 * -logp[torch.arange(3), targets[0]] + 0.1 * -logp.mean(-1)
    torch.testing.assert_close(per, hand)
    assert out.num_masked == 2 and out.num_visible == 1


# ---- FID statistics ---------------------------------------------------------------------------


def test_fid_of_a_statistics_file_against_itself_is_zero(tmp_path):
    from sftok.evaluate.fid import fid_from_statistics, load_statistics

    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 6))
    np.savez(tmp_path / "ref.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    s = load_statistics(tmp_path / "ref.npz")
    assert abs(fid_from_statistics(s, s)) < 1e-6
    shifted = {"mu": s["mu"] + 1.0, "sigma": s["sigma"]}
    assert fid_from_statistics(s, shifted) == pytest.approx(6.0, rel=1e-6)
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=f.mean(0))
    with pytest.raises(ValueError, match="need arrays 'mu' and 'sigma'"):
        load_statistics(tmp_path / "bad.npz")


# ---- pre-tokenisation, training and scoring with a real (random) smoke tokenizer ---------------


@pytest.fixture(scope="module")
def smoke_parts(tmp_path_factory):
    """(cfg, tokenizer checkpoint dir, tokenizer, teacher, train dataset) at smoke size."""
    from sftok.checkpoint import save_model
    from sftok.config import proxy_grid
    from sftok.data import build_train_dataset
    from sftok.presets import get_preset
    from sftok.teacher import FrozenTeacher, MaskGitVQGAN
    from sftok.tokenizer import SFTok

    cfg = get_preset("smoke")
    torch.manual_seed(0)
    teacher = FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size)
    tok = SFTok(cfg.tokenizer, cfg.teacher.codebook_size, proxy_grid(cfg), cfg.teacher).eval()
    d = save_model(tmp_path_factory.mktemp("tok") / "final", tok, cfg)
    return cfg, d, tok, teacher, build_train_dataset(cfg.data)


def test_pretokenize_caches_by_checkpoint_and_data_and_records_the_assignment(smoke_parts,
                                                                              tmp_path):
    from sftok.data.transforms import hflip
    from sftok.generation.pretokenize import cached_tokens, pretokenize

    cfg, ckpt, tok, _, ds = smoke_parts
    ts, hit = cached_tokens(tok, ckpt, ds, "smoke-data", tmp_path, flips=True, batch_size=5)
    assert not hit and len(ts) == 2 * len(ds) and ts.meta["assign"] == "nearest"
    assert ts.flipped.sum() == len(ds) and ts.tokens.shape[1] == cfg.tokenizer.num_latent_tokens
    again, hit = cached_tokens(tok, ckpt, ds, "smoke-data", tmp_path, flips=True, batch_size=5)
    assert hit and torch.equal(again.tokens, ts.tokens) and again.meta == ts.meta
    _, hit = cached_tokens(tok, ckpt, ds, "other-data", tmp_path, flips=True, batch_size=5)
    assert not hit
    # keyed by the weights, not the file or its place: the same model saved again hits
    from sftok.checkpoint import save_model

    copy = save_model(tmp_path / "copy", tok, cfg)
    assert cached_tokens(tok, copy, ds, "smoke-data", tmp_path, flips=True, batch_size=5)[1]
    # nearest assignment: tokens do not depend on the batch; flipped rows encode the mirror
    other = pretokenize(tok, ds, flips=False, batch_size=3)
    assert torch.equal(other.tokens, ts.tokens[~ts.flipped])
    x0 = ds.sample(0)[0][None]
    assert torch.equal(tok.encode(hflip(x0)).ids[0], ts.tokens[ts.flipped][0])
    sk = pretokenize(tok, ds, flips=False, assign="sinkhorn", batch_size=len(ds))
    assert sk.meta["assign"] == "sinkhorn"
    assert tok.quantize.cfg.assign_at_inference == "nearest"  # restored afterwards


def test_train_generator_resumes_and_exports_a_loadable_checkpoint(smoke_parts, tmp_path):
    from sftok.checkpoint import load_model
    from sftok.generation.pretokenize import pretokenize
    from sftok.generation.train import train_generator

    cfg, _, tok, _, ds = smoke_parts
    ts = pretokenize(tok, ds, flips=True, batch_size=8)
    seen = []
    res = train_generator(cfg, ts, tmp_path / "gen", callback=lambda s, m: seen.append((s, m)))
    assert res.steps == cfg.generation.train.steps and [s for s, _ in seen] == [1, 2, 3]
    assert {"loss", "acc_masked", "grad_norm", "lr"} <= set(seen[-1][1])
    model, _ = load_model(res.checkpoint)
    assert isinstance(model, MaskGITGenerator) and model.num_tokens == ts.tokens.shape[1]
    again = train_generator(cfg, ts, tmp_path / "gen")  # finished: read back, not retrained
    assert again.checkpoint == res.checkpoint
    bad = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, num_classes=3))
    with pytest.raises(ValueError, match="set generation.num_classes to at least"):
        train_generator(bad, ts, tmp_path / "bad")


def test_evaluate_generation_scores_n_per_class_and_calibration_rows(smoke_parts, tmp_path):
    from test_eval_helpers import register_tiny_extractor

    from sftok.config import GenerationEvalConfig
    from sftok.generation.evaluate import evaluate_generation
    from sftok.generation.pretokenize import pretokenize
    from sftok.generation.train import build_generator

    cfg, _, tok, teacher, ds = smoke_parts
    ts = pretokenize(tok, ds, flips=True, batch_size=8)
    gen = build_generator(cfg, tok.quantize.codebook_size, ts.tokens.shape[1]).eval()
    g = dataclasses.replace(cfg.generation, eval=GenerationEvalConfig(
        samples_per_class=2, batch_size=8, grid_classes=2, grid_per_class=2,
        sweep_scales=(0.0, 2.0), sweep_temperatures=(0.0,)))
    images = [torch.stack([ds.sample(i)[0] for i in range(len(ds))])]
    name = register_tiny_extractor()
    res = evaluate_generation(gen, tok, teacher, g, cfg.decode, ts, reference_images=images,
                              heldout_images=images, fid_feature_extractor=name,
                              cache_dir=tmp_path, reference_key="smoke")
    m, classes = res.metrics, ts.classes()
    assert m["num_samples"] == 2 * len(classes) and m["num_classes"] == len(classes)
    assert {"gfid", "is", "calib_fid_recon", "calib_fid_heldout"} <= set(m)
    assert m["calib_fid_heldout"] == pytest.approx(0.0, abs=1e-6)  # the same images
    assert m["gfid"] > 0 and not res.unavailable
    size = cfg.tokenizer.image_size
    assert res.grid.shape == (2 * size + 3 * 2, 2 * size + 3 * 2, 3) and res.grid_classes == classes[:2]
    assert [(r["schedule"], r["scale"], r["temperature"]) for r in res.sweep] == [
        ("constant", 0.0, 0.0), ("constant", 2.0, 0.0)]
    assert "sweep/constant/s2/tau0/gfid" in m
    # offline, the standard Inception network is reported unavailable with one message
    no_grid = dataclasses.replace(g, eval=dataclasses.replace(g.eval, grid_classes=0,
                                                               sweep_scales=()))
    off = evaluate_generation(gen, tok, teacher, no_grid, cfg.decode, ts, inception_weights=None)
    assert "gfid" not in off.metrics and "Inception" in off.unavailable["gfid"]
    assert off.metrics["sample_codebook_usage"] > 0
    # the cached reference statistics (key "smoke") are reused for the same images only, as
    # rFID's are: other images under that key are refused with the reason, not scored
    again = evaluate_generation(gen, tok, teacher, no_grid, cfg.decode, ts,
                                reference_images=images, fid_feature_extractor=name,
                                cache_dir=tmp_path, reference_key="smoke")
    assert again.metrics["gfid"] == pytest.approx(m["gfid"], rel=1e-9)
    other = [images[0].flip(-1)]
    refused = evaluate_generation(gen, tok, teacher, no_grid, cfg.decode, ts,
                                  reference_images=other, fid_feature_extractor=name,
                                  cache_dir=tmp_path, reference_key="smoke")
    assert "gfid" not in refused.metrics and "is" in refused.metrics
    assert "computed on other images (reference_key='gen-smoke')" in refused.unavailable["gfid"]


def test_calibration_real_tokens_are_class_balanced():
    from sftok.generation.evaluate import balanced_real_tokens
    from sftok.generation.pretokenize import TokenSet

    labels = torch.tensor([0] * 5 + [3] * 2 + [0] * 5 + [3] * 2)
    flipped = torch.tensor([False] * 7 + [True] * 7)
    tokens = torch.arange(14)[:, None].repeat(1, 4)
    ts = TokenSet(tokens, labels, flipped, {})
    rows = balanced_real_tokens(ts, [0, 3], 3)
    assert rows[:, 0].tolist() == [0, 1, 2, 5, 6]  # 3 of class 0, both (unflipped) of class 3


def test_pretokenize_leaves_out_classless_procedural_images(smoke_parts):
    # tiny trains on 25% dead leaves (label -1): the generator's classes are the photos only.
    import dataclasses as dc

    from sftok.data import build_train_dataset
    from sftok.generation.data import train_data_key
    from sftok.generation.pretokenize import pretokenize

    cfg, _, tok, _, _ = smoke_parts
    data = dc.replace(cfg.data, dead_leaves=0.5)
    ds = build_train_dataset(data)
    labels = torch.tensor([ds.sample(i)[1] for i in range(len(ds))])
    assert (labels < 0).any()
    ts = pretokenize(tok, ds, flips=False, batch_size=5)
    assert len(ts) == int((labels >= 0).sum()) and bool((ts.labels >= 0).all())
    # the token cache key tells the two training sets apart
    assert train_data_key(data) != train_data_key(cfg.data)
