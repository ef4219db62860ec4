"""Unit invariants of the training pieces: masking/replacement, loss weights, optimiser groups,
LR schedule, EMA, checkpoint atomicity, discriminator isolation (no stage runs here)."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sftok.config import OptimConfig, override
from sftok.train.checkpointing import latest_checkpoint, list_checkpoints, save_checkpoint
from sftok.train.discriminator import Adversary, PatchGAN
from sftok.train.ema import EMA
from sftok.train.loop import Precision
from sftok.train.losses import LeCamEMA, hinge_d, hinge_g, weighted_ce
from sftok.train.masking import build_proxy_inputs, sample_mask
from sftok.train.optim import lr_at, no_decay_names, param_groups

V, MASK = 16, 16


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- masking / replacement -----------------------------------------------------------------


def test_none_masks_everything():
    m = sample_mask("none", 3, 20, "arccos", _gen())
    assert m.shape == (3, 20) and m.dtype == torch.bool and bool(m.all())
    targets = torch.randint(0, V, (3, 20))
    p = build_proxy_inputs(targets, m, MASK, "none")
    assert bool((p.ids == MASK).all()) and not bool(p.replaced.any())


def test_random_mask_has_masked_and_visible_positions():
    m = sample_mask("vanilla", 256, 64, "arccos", _gen())
    counts = m.sum(1)
    assert bool((counts >= 1).all())  # every sample predicts something
    assert bool((~m).any(1).float().mean() > 0.5)  # most samples keep visible positions
    # t ~ U(0,1): E[arccos(t)] = 1, so on average 1/(pi/2) = 2/pi ~ 0.637 of N is masked.
    assert abs(m.float().mean().item() - 2 / math.pi) < 0.05


def test_vanilla_visible_positions_carry_ground_truth():
    targets = torch.randint(0, V, (8, 32), generator=_gen(1))
    m = sample_mask("vanilla", 8, 32, "arccos", _gen(2))
    p = build_proxy_inputs(targets, m, MASK, "vanilla", replace_ratio=1.0)
    assert bool((p.ids[m] == MASK).all())
    assert bool((p.ids[~m] == targets[~m]).all())
    assert not bool(p.replaced.any())


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8, 1.0])
def test_sfvr_replaces_ratio_of_visible_positions(ratio):
    b, n = 64, 64
    targets = torch.randint(0, V, (b, n), generator=_gen(3))
    m = sample_mask("sfvr", b, n, "arccos", _gen(4))
    calls = []

    def first_step(ids):  # step-1 prediction: argmax = (target + 1) mod V, never the target
        calls.append(ids.clone())
        return F.one_hot((targets + 1) % V, V).float() * 5.0

    p = build_proxy_inputs(targets, m, MASK, "sfvr", replace_ratio=ratio,
                           first_step_fn=first_step, generator=_gen(5))
    assert len(calls) == 1 and bool((calls[0] == MASK).all())  # an all-masked pass
    visible = ~m
    assert bool((p.ids[m] == MASK).all())
    assert not bool(p.replaced[m].any())
    pred = (targets + 1) % V
    assert bool((p.ids[p.replaced] == pred[p.replaced]).all())
    kept = visible & ~p.replaced
    assert bool((p.ids[kept] == targets[kept]).all())
    frac = p.replaced.sum().item() / visible.sum().item()
    n_vis = visible.sum().item()
    tol = 4 * math.sqrt(max(ratio * (1 - ratio), 1e-9) / n_vis) + 1e-9
    assert abs(frac - ratio) <= tol, (frac, ratio, tol)


def test_sfvr_with_real_decoder_uses_its_step1_argmax():
    from sftok.presets import get_preset
    from sftok.tokenizer import SFTok

    cfg = get_preset("smoke")
    torch.manual_seed(0)
    model = SFTok(cfg.tokenizer, num_codes=64, grid=8)
    images = torch.rand(4, 3, 16, 16, generator=_gen(6))
    z_q = model.encode(images).z_q
    targets = torch.randint(0, 64, (4, 64), generator=_gen(7))
    m = sample_mask("sfvr", 4, 64, "arccos", _gen(8))
    p = build_proxy_inputs(targets, m, model.mask_id, "sfvr", 1.0,
                           first_step_fn=lambda ids: model.decoder_logits(ids, z_q),
                           generator=_gen(9))
    with torch.no_grad():
        step1 = model.decoder_logits(torch.full_like(targets, model.mask_id), z_q).argmax(-1)
    assert bool(p.replaced.eq(~m).all())  # ratio 1: every visible position replaced
    assert bool((p.ids[~m] == step1[~m]).all())


# ---- losses ---------------------------------------------------------------------------------


def test_weighted_ce_hand_computed():
    # Two positions, V=2. Position 0 masked, uniform logits -> ce0 = log 2.
    # Position 1 visible, p(target) = 3/4 -> ce1 = -log(3/4). loss = (1·ce0 + 0.1·ce1) / 1.1.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    targets = torch.tensor([[1, 0]])
    masked = torch.tensor([[True, False]])
    out = weighted_ce(logits, targets, masked, unmasked_weight=0.1)
    ce0, ce1 = math.log(2.0), -math.log(0.75)
    assert out.loss.item() == pytest.approx((ce0 + 0.1 * ce1) / 1.1, rel=1e-6)
    assert out.ce_sum_masked.item() == pytest.approx(ce0, rel=1e-6)
    assert out.ce_sum_visible.item() == pytest.approx(ce1, rel=1e-6)
    assert (out.num_masked, out.num_visible) == (1, 1)
    # all masked: plain mean CE
    out = weighted_ce(logits, targets, torch.ones_like(masked), 0.1)
    assert out.loss.item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def test_hinge_and_lecam():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # the paper's scale: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))
    assert hinge_d(real, fake).item() == pytest.approx(0.5 * ((0 + 1) / 2 + (0 + 1.5) / 2))
    assert hinge_g(fake).item() == pytest.approx(0.75)
    lecam = LeCamEMA(decay=0.5)
    assert lecam.ema_real.item() == 0.0 and lecam.ema_fake.item() == 0.0  # anchors start at 0
    # before any update: relu(real - 0)^2 mean + relu(0 - fake)^2 mean
    assert lecam(real, fake).item() == pytest.approx((4 + 0) / 2 + (4 + 0) / 2)
    lecam.update(real, fake)  # ema <- 0.5 * ema + 0.5 * mean
    assert lecam.ema_real.item() == pytest.approx(0.5)
    assert lecam.ema_fake.item() == pytest.approx(-0.375)
    expect = ((2.375 ** 2 + 0.375 ** 2) / 2) + ((2.5 ** 2 + 0.0) / 2)
    assert lecam(real, fake).item() == pytest.approx(expect)


# ---- optimiser, schedule, EMA ---------------------------------------------------------------


def test_no_decay_groups_on_real_tokenizer():
    from sftok.presets import get_preset
    from sftok.tokenizer import SFTok

    cfg = get_preset("smoke")
    model = SFTok(cfg.tokenizer, num_codes=64, grid=8)
    skip = no_decay_names(model)
    names = dict(model.named_parameters())
    for name, p in names.items():
        if p.ndim == 1 or "ln_" in name or "embedding" in name or "latent_tokens" in name:
            assert name in skip, name
    # the transformer's projection matrices and the logits head are decayed
    decayed = [n for n, p in names.items() if n not in skip]
    assert any("mlp.c_fc.weight" in n for n in decayed)
    assert any("attn.in_proj_weight" in n for n in decayed)
    assert "decoder.head.0.weight" in decayed
    assert "encoder.class_embedding" in skip and "encoder.positional_embedding" in skip
    groups = param_groups(model, 1e-4)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_no_decay_rules_on_generic_modules():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(3, 4), nn.Conv2d(3, 3, 3),
                      nn.GroupNorm(1, 3))
    skip = no_decay_names(m)
    assert skip == {"0.bias", "1.weight", "1.bias", "2.weight", "3.bias", "4.weight", "4.bias"}


def test_lr_schedule_warmup_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, end_lr=0.1)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.55)
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_ema_update_rule():
    m = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(m.weight)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # decay warm-up: min(0.5, 1/10) = 0.1 -> 0.9
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(0.9)
    ema.update(m)  # min(0.5, 2/11) -> 0.9 + (1-2/11)(0.1)
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(0.9 + (1 - 2 / 11) * 0.1)


def test_ema_matches_per_tensor_rule_on_params_and_buffers():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(m, decay=0.9)
    expected = {k: v.clone() for k, v in m.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        m.train()(torch.randn(8, 4))  # moves BatchNorm's running stats; bumps the int counter
        w = 1.0 - min(0.9, (1.0 + step) / (10.0 + step))
        for k, v in m.state_dict().items():
            expected[k] = expected[k] + w * (v - expected[k]) if v.is_floating_point() else v.clone()
        ema.update(m)
    for k, v in expected.items():
        torch.testing.assert_close(ema.shadow[k], v)
    assert ema.shadow["1.num_batches_tracked"].item() == 3


# ---- checkpoints -----------------------------------------------------------------------------


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    sd = {"model": {"w": torch.ones(2)}}
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, sd, {"x": torch.zeros(1)}, {"a": 1}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    # a half-written checkpoint (no state.json) and temporaries are never picked up
    (tmp_path / "step_00000008").mkdir()
    (tmp_path / ".tmp-step_00000010-1").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000006"


# ---- discriminator isolation -----------------------------------------------------------------


def test_generator_step_leaves_no_gradient_in_discriminator():
    adv = Adversary("patchgan", 16, OptimConfig(), torch.device("cpu"),
                    Precision("fp32", torch.device("cpu")), lecam_weight=0.001)
    before = {k: v.clone() for k, v in adv.disc.state_dict().items()}
    fake = torch.rand(2, 3, 16, 16, requires_grad=True)
    adv.generator_loss(fake).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in adv.disc.parameters())
    assert all(p.requires_grad for p in adv.disc.parameters())  # trainable again afterwards
    assert all(torch.equal(before[k], v) for k, v in adv.disc.state_dict().items())
    # the discriminator's own update does change it
    adv.update([torch.rand(2, 3, 16, 16)], [fake.detach()], lr=1e-3)
    assert any(not torch.equal(before[k], v) for k, v in adv.disc.state_dict().items())


def test_dino_falls_back_to_patchgan_without_weights(monkeypatch):
    from sftok.train import discriminator, losses

    monkeypatch.setattr(discriminator, "find_dino_weights", lambda: None)
    monkeypatch.setattr(losses, "_warned", set())  # the warning is said once per process
    with pytest.warns(UserWarning, match="DINO"):
        d = discriminator.build_discriminator("dino", 32)
    assert isinstance(d, PatchGAN)


def test_benchmark_reports_throughput_per_stage():
    from sftok.presets import get_preset
    from sftok.train.benchmark import benchmark_training, format_table

    rows = benchmark_training(get_preset("smoke"), steps=1, warmup=1, device="cpu")
    assert [r["stage"] for r in rows] == ["stage0", "stage1", "stage2", "stage3"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "images/s" in format_table(rows)
    assert {(r["compiled"], r["mode"]) for r in rows} == {(None, "eager")}


def test_benchmark_rows_say_whether_compiling_worked():
    """A compiled row names its backend; one whose compilation failed says it ran eager (the
    label Table 5 and the device report show), with the warning counted once, not raised."""
    from sftok.presets import get_preset
    from sftok.train.benchmark import benchmark_training

    def broken(gm, example_inputs):
        raise RuntimeError("forced compile failure (test)")

    cfg = get_preset("smoke")
    ok, = benchmark_training(cfg, stages=("stage1",), steps=1, warmup=1, device="cpu",
                             compile_backend="eager")
    assert (ok["compiled"], ok["mode"]) == ("eager", "compile (eager)")
    failed, = benchmark_training(cfg, stages=("stage1",), steps=1, warmup=1, device="cpu",
                                 compile_backend=broken)
    assert failed["mode"].startswith("eager (compile (") and failed["mode"].endswith(" failed)")
    assert failed["compiled"].startswith("failed (") and failed["images_per_s"] > 0


def test_largest_batch_brackets_the_out_of_memory_size(monkeypatch):
    """Doubling then bisection to 1/16 of the fitting size; a non-OOM error is not a size."""
    from sftok.presets import get_preset
    from sftok.train import benchmark

    class Task:
        def __init__(self, fits):
            self.fits, self.optimizer = fits, torch.optim.SGD([torch.zeros(1)], lr=0.1)

        def step(self, batches, step):
            if batches[0].shape[0] > self.fits:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    cfg = get_preset("smoke")
    s2 = cfg.train.stage2
    monkeypatch.setattr(benchmark, "_stage_task", lambda *a: (Task(100), 4, 1, s2))
    res = benchmark.largest_batch(cfg, "stage2", "cpu", start=8, limit=4096)
    assert (res["largest_ok"], res["smallest_failed"], res["stopped"]) == (100, 104,
                                                                          "oom bracket")
    assert [p["batch"] for p in res["probes"]] == [8, 16, 32, 64, 128, 96, 112, 104, 100]
    assert "out of memory" in res["probes"][4]["error"]
    capped = benchmark.largest_batch(cfg, "stage2", "cpu", start=8, limit=64)
    assert (capped["largest_ok"], capped["smallest_failed"], capped["stopped"]) == (64, None,
                                                                                   "limit")

    class Broken(Task):
        def step(self, batches, step):
            raise RuntimeError("shape mismatch")

    monkeypatch.setattr(benchmark, "_stage_task", lambda *a: (Broken(0), 4, 1, s2))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        benchmark.largest_batch(cfg, "stage2", "cpu")


def test_throughput_record_reads_from_benchmark_json_and_device_reports(tmp_path):
    from sftok.train.benchmark import read_throughput, throughput_record

    rows = [{"preset": "smoke", "stage": "stage1", "images_per_s": 3.0}]
    record = throughput_record(rows, "cpu")
    (tmp_path / "bench.json").write_text(json.dumps(record))
    (tmp_path / "report.json").write_text(json.dumps({"schema": "x", "throughput": record}))
    assert read_throughput(tmp_path / "bench.json") == record == {"device_name": "cpu",
                                                                  "rows": rows}
    assert read_throughput(tmp_path / "report.json") == record
    (tmp_path / "other.json").write_text(json.dumps({"steps": []}))
    with pytest.raises(ValueError, match="other.json: no throughput rows"):
        read_throughput(tmp_path / "other.json")


@pytest.mark.slow
def test_compiled_token_step_matches_eager_on_cpu():
    """`train.<stage>.compile` (torch.compile of the tokenizer's children, in place) runs on
    CPU where a C++ compiler exists, keeps the state-dict keys, and gives the eager numbers up
    to float reassociation. Slow: inductor's first compile takes minutes on 2 cores."""
    import shutil

    from sftok.presets import get_preset
    from sftok.teacher import FrozenTeacher, MaskGitVQGAN
    from sftok.train.stages import build_stage_task

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    cfg = get_preset("smoke")
    torch.manual_seed(0)
    teacher = FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size)
    batches = [(torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))]
    out, keys = {}, {}
    for comp in (False, True):
        task = build_stage_task(override(cfg, {"train.stage2.compile": comp}), "stage2",
                                teacher, torch.device("cpu"))
        out[comp] = [{k: float(v) for k, v in task.step(batches, i).items()} for i in range(2)]
        keys[comp] = list(task.model.state_dict())
    assert keys[True] == keys[False]
    for eager, compiled in zip(out[False], out[True]):
        assert eager.keys() == compiled.keys()
        for k in eager:
            assert compiled[k] == pytest.approx(eager[k], rel=1e-3, abs=1e-4), k
def test_sfvr_step1_pass_runs_in_float32_under_autocast():
    """StageConfig.sfvr_pass_fp32 (as the reference's generate_guided_mask): the step-1 argmax
    pass ignores the surrounding autocast; with fp32=False it follows it."""
    from sftok.train.masking import step1_logits_fn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 8)
            self.proj = nn.Linear(8, 8)

        def decoder_logits(self, ids, z):
            return self.proj(self.emb(ids) + z.mean(1, keepdim=True))

    model, z = Toy(), torch.randn(2, 3, 8)
    ids = torch.full((2, 5), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bf16 = z.to(torch.bfloat16)
        assert step1_logits_fn(model, z_bf16, fp32=True)(ids).dtype == torch.float32
        assert step1_logits_fn(model, z_bf16, fp32=False)(ids).dtype == torch.bfloat16
    ref = model.decoder_logits(ids, z_bf16.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(step1_logits_fn(model, z_bf16)(ids), ref)


def test_cpu_device_flushes_denormals():
    # Denormal activations (flat image regions) made tiny's teacher ~6x slower on CPU.
    from sftok.train.loop import resolve_device

    torch.set_flush_denormal(False)
    assert torch.tensor([1e-40], dtype=torch.float32).item() != 0.0  # denormal kept
    assert resolve_device("cpu").type == "cpu"
    assert torch.tensor([1e-40], dtype=torch.float32).item() == 0.0  # flushed
