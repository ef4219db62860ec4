"""evaluate() end to end on toy tokenizer / teacher fakes and on the real smoke-scale SFTok."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision
from test_eval_helpers import (
    SIZE,
    FakeTeacher,
    FakeTokenizer,
    N,
    batches,
    fake_images,
    register_tiny_extractor,
)

from sftok.config import EvalConfig
from sftok.evaluate import EvalResult, evaluate, format_table
from sftok.evaluate.fid import INCEPTION_ENV
from sftok.evaluate.perceptual import LPIPS_ENV
from sftok.evaluate.trace import TRACE_COLUMNS

STEPS = (1, 2, 4)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No pretrained weights anywhere: empty torch hub dir, no env vars."""
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.delenv(LPIPS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def _cfg(**kw):
    base = {"decode_steps": STEPS, "trace_steps": 4, "batch_size": 5, "max_images": None,
            "grid_images": 3, "seed": 0}
    base.update(kw)
    return EvalConfig(**base)


def test_offline_metrics_unavailable_others_present(offline):
    x = fake_images(12)
    r = evaluate(FakeTokenizer(), FakeTeacher(), batches(x, 7), _cfg(), progress=False)
    assert isinstance(r, EvalResult)
    assert set(r.unavailable) == {"rfid", "is", "lpips"}
    for k in ("rfid", "is"):
        assert INCEPTION_ENV in r.unavailable[k] and "weights-inception-2015-12-05" in r.unavailable[k]
    assert LPIPS_ENV in r.unavailable["lpips"] and "alexnet" in r.unavailable["lpips"]
    assert not any(k.startswith(("rfid", "is_", "lpips")) for k in r.metrics)  # no made-up numbers
    for s in STEPS:
        assert 0 < r.metrics[f"psnr_s{s}"] < 100
        assert -1 <= r.metrics[f"ssim_s{s}"] <= 1
    for k in ("token_top1", "token_ce", "codebook_usage", "codebook_entropy"):
        assert k in r.metrics
    assert r.metrics["num_images"] == 12
    # trace: one row per step of the trace decode, positions fixed sum to N
    assert [row["step"] for row in r.trace] == [1, 2, 3, 4]
    assert all(tuple(row) == TRACE_COLUMNS for row in r.trace)
    assert sum(row["num_fixed"] for row in r.trace) == pytest.approx(N)
    assert r.trace[-1]["kl_final_all"] == pytest.approx(0.0, abs=1e-6)
    # the step-1 token metrics are the trace's step 1 (same all-masked prediction)
    assert r.metrics["token_top1"] == pytest.approx(r.trace[0]["top1_gt_all"])
    assert r.metrics["token_ce"] == pytest.approx(r.trace[0]["kl_gt_all"], rel=1e-5)
    # grids: 3 originals over 3 reconstructions, with 2-pixel padding
    assert set(r.grids) == set(STEPS)
    g = r.grids[1]
    assert g.dtype == np.uint8 and g.shape == (2 * SIZE + 6, 3 * SIZE + 8, 3)
    orig = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(g[2:2 + SIZE, 2:2 + SIZE], orig)
    assert "psnr" in format_table(r) and "unavailable rfid" in format_table(r)


def test_determinism_batching_and_max_images(offline):
    x = fake_images(11)
    cfg = _cfg(max_images=9, metrics=("psnr", "ssim", "tokens"))
    r1 = evaluate(FakeTokenizer(), FakeTeacher(), batches(x, 4), cfg, progress=False)
    r2 = evaluate(FakeTokenizer(), FakeTeacher(), [x], cfg, progress=False)  # other batching
    assert r1.metrics["num_images"] == 9
    assert r1.unavailable == {}  # metrics not asked for are neither computed nor "unavailable"
    for k, v in r1.metrics.items():
        assert r2.metrics[k] == pytest.approx(v, rel=1e-9), k
    # the single-step reconstruction is independent of the decode loop; check PSNR directly
    tok, teacher = FakeTokenizer(), FakeTeacher()
    from sftok.config import DecodeConfig
    from sftok.data.uint8 import to_uint8
    from sftok.evaluate.metrics import psnr
    rec = tok.reconstruct(x[:9], teacher, DecodeConfig(steps=1))
    assert r1.metrics["psnr_s1"] == pytest.approx(psnr(to_uint8(rec), to_uint8(x[:9])).mean().item())


def test_fid_is_through_wrapper_and_reference_cache(offline):
    name = register_tiny_extractor()
    x = fake_images(16)
    cfg = _cfg(metrics=("rfid", "is", "psnr"), trace_steps=0)
    kw = {"progress": False, "fid_feature_extractor": name, "cache_dir": offline / "cache",
          "dataset_key": "fake-val-16"}
    r1 = evaluate(FakeTokenizer(), FakeTeacher(), batches(x, 6), cfg, **kw)
    assert r1.unavailable == {} and r1.trace == []
    for s in STEPS:
        assert r1.metrics[f"rfid_s{s}"] > 0 and r1.metrics[f"is_s{s}"] >= 1.0
    cached = list((offline / "cache" / "fid_stats").glob("*.npz"))
    assert len(cached) == 1 and "fake-val-16" in cached[0].name
    # second run: reference statistics come from the cache, same numbers
    r2 = evaluate(FakeTokenizer(), FakeTeacher(), batches(x, 6), cfg, **kw)
    for s in STEPS:
        assert r2.metrics[f"rfid_s{s}"] == pytest.approx(r1.metrics[f"rfid_s{s}"], rel=1e-9)
    # other images under the same key: refused with a message, not a wrong number
    r3 = evaluate(FakeTokenizer(), FakeTeacher(), batches(fake_images(16, seed=5), 6), cfg, **kw)
    assert "rfid" in r3.unavailable and "dataset_key" in r3.unavailable["rfid"]
    assert "rfid_s1" not in r3.metrics and "is_s1" in r3.metrics


def test_lpips_with_local_backbone_file(offline, monkeypatch):
    """The LPIPS path with a local backbone file (random weights stand in for ImageNet ones)."""
    w = offline / "alexnet.pth"
    torch.manual_seed(0)
    sd = torchvision.models.alexnet(weights=None).state_dict()
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, w)  # what LPIPS uses
    monkeypatch.setenv(LPIPS_ENV, str(w))
    from sftok.evaluate.perceptual import LPIPSMetric
    m = LPIPSMetric(w)
    sd = torch.load(w, weights_only=True)
    assert torch.equal(m.model.net.slice1[0].weight.cpu(), sd["features.0.weight"])
    x = fake_images(4, size=32)
    assert torch.allclose(m(x, x), torch.zeros(4), atol=1e-6)
    cfg = _cfg(metrics=("lpips",), trace_steps=0, decode_steps=(2,))
    r = evaluate(FakeTokenizer(), FakeTeacher(size=32), batches(x, 4), cfg, progress=False)
    assert "lpips" not in r.unavailable and r.metrics["lpips_s2"] > 0
    # AlexNet cannot see 16-pixel images: said so, not crashed
    r = evaluate(FakeTokenizer(), FakeTeacher(), batches(fake_images(4), 4), cfg, progress=False)
    assert "lpips_s2" not in r.metrics and "too small" in r.unavailable["lpips"]


# ---------------------------------------------------------------- the real SFTok / FrozenTeacher

def _smoke_models():
    from sftok.config import proxy_grid
    from sftok.presets import get_preset
    from sftok.teacher import FrozenTeacher, MaskGitVQGAN
    from sftok.tokenizer import SFTok

    cfg = get_preset("smoke")
    torch.manual_seed(0)
    tok = SFTok(cfg.tokenizer, cfg.teacher.codebook_size, proxy_grid(cfg))
    teacher = FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size)
    return cfg, tok, teacher


def test_real_sftok_smoke(offline):
    """Random-init smoke-scale SFTok + teacher through the contract (shapes and names only)."""
    cfg, tok, teacher = _smoke_models()
    x = torch.rand(6, 3, cfg.tokenizer.image_size, cfg.tokenizer.image_size)
    ev = EvalConfig(decode_steps=(1, 3), trace_steps=3, batch_size=4, grid_images=2,
                    metrics=("psnr", "ssim", "tokens", "rfid"))
    tok.train()
    r = evaluate(tok, teacher, [x], ev, progress=False, decode_cfg=cfg.decode)
    assert tok.training  # mode restored
    assert {"psnr_s1", "psnr_s3", "ssim_s3", "token_top1", "codebook_usage"} <= set(r.metrics)
    assert set(r.unavailable) == {"rfid"}
    n = teacher.grid ** 2
    assert sum(row["num_fixed"] for row in r.trace) == pytest.approx(n)
    assert r.trace[-1]["top1_final_masked"] == 1.0
    assert r.grids[3].shape == (2 * 16 + 6, 2 * 16 + 6, 3)


def test_cli_on_saved_checkpoint(offline, capsys):
    from sftok.checkpoint import save_model
    from sftok.evaluate.__main__ import main

    cfg, tok, teacher = _smoke_models()
    save_model(offline / "tok", tok, cfg)
    save_model(offline / "teacher", teacher, cfg.teacher)
    out = offline / "out"
    rc = main([str(offline / "tok"), "--teacher-checkpoint", str(offline / "teacher"),
               "--data", "embedded", "--steps", "1", "2", "--max-images", "3", "--device", "cpu",
               "--metrics", "psnr", "rfid", "--cache-dir", str(offline / "cache"),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "psnr" in text and "unavailable rfid" in text and "kl_gt_all" in text
    import json
    saved = json.loads((out / "eval.json").read_text())
    assert saved["metrics"]["num_images"] == 3 and "rfid" in saved["unavailable"]
    # the schema of a trial's eval.json (sftok.run_record), the config beside it
    assert set(saved) == {"metrics", "unavailable"}
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["eval"]["decode_steps"] == [1, 2] and config["eval"]["max_images"] == 3
    assert (out / "trace.csv").is_file() and (out / "grids" / "recon_s2.png").is_file()
    # the floors and the ceiling come with every evaluation (issue 9); the palettes are cached
    assert {"floor_tokenizer_psnr", "floor_teacher_psnr", "teacher_psnr"} <= set(saved["metrics"])
    assert len(list((offline / "cache" / "eval" / "floor_palettes").glob("*.safetensors"))) == 2


def test_single_image_rfid_is_unavailable_not_a_crash(offline):
    name = register_tiny_extractor()
    r = evaluate(FakeTokenizer(), FakeTeacher(), [fake_images(1)],
                 _cfg(metrics=("rfid", "psnr"), trace_steps=0), progress=False,
                 fid_feature_extractor=name)
    assert "rfid" in r.unavailable and "psnr_s1" in r.metrics and "rfid_s1" not in r.metrics


def test_corrupt_inception_file_is_reported(offline, monkeypatch):
    bad = offline / "weights-inception-2015-12-05-6726825d.pth"
    bad.write_bytes(b"not a tensor file")
    monkeypatch.setenv(INCEPTION_ENV, str(bad))
    r = evaluate(FakeTokenizer(), FakeTeacher(), [fake_images(3)],
                 _cfg(metrics=("rfid", "is", "ssim"), trace_steps=0), progress=False)
    assert r.unavailable["rfid"].startswith("could not load") and str(bad) in r.unavailable["is"]
    assert "ssim_s4" in r.metrics


def test_cli_never_trains_a_missing_teacher(offline, capsys):
    # Without --teacher-*, the CLI loads the cached teacher of the checkpoint's config; a missing
    # one is an error (training a new one would silently change the codebook).
    from sftok.checkpoint import save_model
    from sftok.evaluate.__main__ import main

    cfg, tok, _ = _smoke_models()
    save_model(offline / "tok", tok, cfg)
    cache = offline / "empty-cache"
    assert main([str(offline / "tok"), "--data", "embedded", "--device", "cpu",
                 "--cache-dir", str(cache), "--no-progress"]) == 2
    assert re.search("teacher unavailable.*--teacher-weights", capsys.readouterr().err)
    assert not any((cache / "teachers").glob("teacher-*/teacher.json"))


def test_cli_assignment_at_inference_and_fixed_architecture(offline, monkeypatch):
    from sftok.checkpoint import save_model
    from sftok.evaluate import __main__ as cli

    cfg, tok, teacher = _smoke_models()
    save_model(offline / "tok", tok, cfg)
    save_model(offline / "teacher", teacher, cfg.teacher)
    seen = {}

    def fake_evaluate(tokenizer, *a, **k):  # capture what the CLI built, skip the work
        seen["assign"] = tokenizer.quantize.cfg.assign_at_inference
        raise SystemExit(0)

    monkeypatch.setattr(cli, "evaluate", fake_evaluate)
    base = [str(offline / "tok"), "--teacher-checkpoint", str(offline / "teacher"),
            "--data", "embedded", "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit):
        cli.main(base + ["--assign-at-inference", "sinkhorn"])
    assert seen["assign"] == "sinkhorn"
    with pytest.raises(SystemExit, match="defined by the checkpoint"):
        cli.main(base + ["--set", "tokenizer.encoder.width=64"])


def test_temperature_is_the_decode_config_and_seeded_by_eval_seed(offline):
    """tau comes from decode_cfg (one knob; eval.temperature None) and every draw from a
    generator seeded with eval.seed: same seed, same numbers; another seed, other numbers."""
    import dataclasses

    cfg, tok, teacher = _smoke_models()
    x = torch.rand(6, 3, cfg.tokenizer.image_size, cfg.tokenizer.image_size,
                   generator=torch.Generator().manual_seed(0))
    paper = dataclasses.replace(cfg.decode, temperature=1.0)

    def run(seed, decode_cfg=paper, temperature=None):
        ev = EvalConfig(decode_steps=(4,), trace_steps=0, batch_size=6, grid_images=0,
                        metrics=("psnr",), seed=seed, temperature=temperature)
        return evaluate(tok, teacher, [x], ev, progress=False, decode_cfg=decode_cfg).metrics

    a, b, c = run(0), run(0), run(1)
    assert a == b and a["psnr_s4"] != c["psnr_s4"]
    argmax = run(0, decode_cfg=cfg.decode)  # tiny/smoke presets: tau = 0
    assert argmax == run(1, decode_cfg=cfg.decode) == run(0, temperature=0.0)
    assert argmax["psnr_s4"] != a["psnr_s4"]
