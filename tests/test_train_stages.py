"""Smoke runs of stage 0-3: each stage trains a few steps, resume is bitwise exact, the teacher
is cached and never modified, stage 3 freezes encoder + quantizer, a NaN loss stops the stage
with the promised message. Never asserts that a model learned (DESIGN §4)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftok.config import override
from sftok.presets import get_preset
from sftok.train import (
    NonFiniteLossError,
    TeacherUnavailableError,
    get_teacher,
    teacher_cache_key,
    teacher_info,
    teacher_stage,
    train_stage,
)
from sftok.train import stages as stages_mod

TOKEN_METRICS = {"loss", "ce", "ce_masked", "quant_loss", "replaced_frac", "lr", "grad_norm",
                 "images_per_s"}


class Crash(Exception):
    pass


def _cfg(**sets):
    cfg = get_preset("smoke")
    return override(cfg, sets) if sets else cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def stage1(workdir, smoke_teacher):
    return train_stage(_cfg(), "stage1", smoke_teacher, workdir / "stage1")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


# ---- stage 0 ---------------------------------------------------------------------------------


def test_teacher_is_cached_and_reused(smoke_teacher_run, monkeypatch):
    cfg = _cfg()
    reports = smoke_teacher_run.reports  # the stage-0 callback while it trained
    assert reports and {"loss", "l2", "commit", "psnr"} <= set(reports[0][1])
    entry = smoke_teacher_run.cache / teacher_cache_key(cfg)
    info = teacher_info(entry)
    assert info["steps"] == cfg.train.teacher.steps and "val_psnr" in info
    monkeypatch.setattr(teacher_stage, "train_teacher",
                        lambda *a, **k: pytest.fail("a cached teacher must not be retrained"))
    again = get_teacher(cfg, smoke_teacher_run.cache)
    _assert_same(again.model.state_dict(), smoke_teacher_run.teacher.model.state_dict())
    assert not any(p.requires_grad for p in again.parameters())


def test_teacher_cache_key_tracks_data_and_teacher_config():
    base = teacher_cache_key(_cfg())
    assert base == teacher_cache_key(_cfg(seed=7))  # trials with other seeds share it
    assert base == teacher_cache_key(_cfg(**{"data.num_workers": 2}))
    assert base == teacher_cache_key(_cfg(**{"train.teacher.ckpt_every": 7}))
    assert base != teacher_cache_key(_cfg(**{"data.seed": 1}))
    assert base != teacher_cache_key(_cfg(**{"teacher.codebook_size": 32}))
    assert base != teacher_cache_key(_cfg(**{"train.teacher.steps": 5}))


def test_pretrained_teacher_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg(**{"teacher.source": "pretrained", "teacher.weights": str(tmp_path / "no.bin")})
    with pytest.raises(TeacherUnavailableError, match="--set teacher.weights="):
        get_teacher(cfg, tmp_path)
    cfg = _cfg(**{"teacher.source": "pretrained"})
    with pytest.raises(TeacherUnavailableError, match="maskgit-vqgan-imagenet-f16-256.bin"):
        get_teacher(cfg, tmp_path)


def test_teacher_training_resumes_exactly(tmp_path):
    cfg = _cfg(**{"train.teacher.ckpt_every": 2, "train.teacher.log_every": 1})
    teacher_stage.train_teacher(cfg, tmp_path / "a")

    def crash(step, metrics):
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        teacher_stage.train_teacher(cfg, tmp_path / "b", callback=crash)
    teacher_stage.train_teacher(cfg, tmp_path / "b")
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


# ---- stages 1-3 ------------------------------------------------------------------------------


def test_each_stage_runs_and_reports_metrics(workdir, smoke_teacher, stage1):
    cfg = _cfg()
    teacher_before = {k: v.clone() for k, v in smoke_teacher.model.state_dict().items()}
    seen = []
    s2 = train_stage(cfg, "stage2", smoke_teacher, workdir / "stage2", init=stage1.checkpoint,
                     callback=lambda s, m: seen.append((s, m)), step_offset=stage1.steps)
    assert [s for s, _ in seen] == [4, 5, 6]  # global steps continue after stage 1
    assert TOKEN_METRICS <= set(seen[-1][1]) and "ce_visible" in seen[-1][1]
    assert seen[-1][1]["replaced_frac"] == 1.0  # sfvr with replace_ratio 1 (paper default)
    assert TOKEN_METRICS <= set(stage1.metrics) and stage1.metrics["replaced_frac"] == 0.0
    meta = json.loads((s2.checkpoint / "stage.json").read_text())
    assert meta["weights"] == "EMA weights" and s2.steps == 3
    s3_seen = []
    s3 = train_stage(cfg, "stage3", smoke_teacher, workdir / "stage3", init=s2.checkpoint,
                     callback=lambda s, m: s3_seen.append(m))
    assert {"loss", "l2", "gan_g", "gan_d", "lecam", "lr", "grad_norm",
            "images_per_s"} <= set(s3_seen[-1])  # smoke: gan_start = 1
    # the frozen teacher is untouched by all of it
    _assert_same(teacher_before, smoke_teacher.model.state_dict())
    from sftok.checkpoint import load_model

    model, saved_cfg = load_model(s3.checkpoint)
    assert saved_cfg.tokenizer.finetune_decoder and model.pixel_decoder is not None


@pytest.mark.parametrize("train_codebook", [True, False])
def test_stage3_freezes_encoder_and_quantizer(workdir, smoke_teacher, stage1, train_codebook):
    from sftok.train.stage3 import PixelTask

    cfg = stages_mod.stage_config(_cfg(**{"train.stage3.train_pixel_codebook": train_codebook}),
                                  "stage3")
    task = PixelTask(cfg, smoke_teacher, torch.device("cpu"), init=stage1.checkpoint)
    # pixel path starts as the teacher's codebook and decoder
    assert torch.equal(task.model.pixel_quantize.embedding.weight, smoke_teacher.codebook())
    # the pixel codebook is trained iff configured (the released code trains it)
    assert task.model.pixel_quantize.embedding.weight.requires_grad == train_codebook
    # frozen quantizer keeps its training (Sinkhorn) assignment; frozen encoder in eval mode
    assert task.model.quantize.training and not task.model.encoder.training
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    disc_before = {k: v.clone() for k, v in task.adversary.disc.state_dict().items()}
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    task.step([images], step=0)  # step 0 < gan_start=1: generator update only
    after = task.model.state_dict()
    for k, v in before.items():
        if k.startswith(("encoder.", "quantize.")):
            assert torch.equal(v, after[k]), f"{k} changed in stage 3"
    codebook = "pixel_quantize.embedding.weight"
    assert torch.equal(before[codebook], after[codebook]) != train_codebook
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before
               if k.startswith("pixel_decoder."))
    _assert_same(disc_before, task.adversary.disc.state_dict())
    task.step([images], step=1)  # GAN on: discriminator updated by its own step only
    for k, v in task.model.state_dict().items():
        if k.startswith(("encoder.", "quantize.")):
            assert torch.equal(before[k], v), k


def test_stage3_pixel_path_starts_from_the_teacher_unless_trained(tmp_path, smoke_teacher):
    """With finetune_decoder on from stage 1, the stage-2 checkpoint carries an untrained, random
    pixel path: stage 3 must still start it from the teacher; a stage-3 result keeps its own."""
    from sftok.train.stage3 import PixelTask

    cfg = _cfg(**{"tokenizer.finetune_decoder": True})
    s1 = train_stage(cfg, "stage1", smoke_teacher, tmp_path / "stage1")
    assert any(k.startswith("pixel_decoder.") for k in _weights(s1.checkpoint))
    s3cfg = stages_mod.stage_config(cfg, "stage3")
    task = PixelTask(s3cfg, smoke_teacher, torch.device("cpu"), init=s1.checkpoint)
    assert torch.equal(task.model.pixel_quantize.embedding.weight, smoke_teacher.codebook())
    _assert_same({k: v for k, v in task.model.pixel_decoder.state_dict().items()},
                 smoke_teacher.model.decoder.state_dict())
    # the same through a model file instead of the stage's directory
    task = PixelTask(s3cfg, smoke_teacher, torch.device("cpu"),
                     init=s1.checkpoint / "model.safetensors")
    assert torch.equal(task.model.pixel_quantize.embedding.weight, smoke_teacher.codebook())
    s3 = train_stage(cfg, "stage3", smoke_teacher, tmp_path / "stage3", init=s1.checkpoint)
    trained = {k[len("pixel_decoder."):]: v for k, v in _weights(s3.checkpoint).items()
               if k.startswith("pixel_decoder.")}
    again = PixelTask(s3cfg, smoke_teacher, torch.device("cpu"), init=s3.checkpoint)
    _assert_same(again.model.pixel_decoder.state_dict(), trained)
    assert any(not torch.equal(v, smoke_teacher.model.decoder.state_dict()[k])
               for k, v in trained.items())


def test_stage3_input_is_guided_by_the_step1_prediction(smoke_teacher, stage1, monkeypatch):
    """Table 6 stage 3 ("Guided Mask True"): visible positions carry the step-1 argmax."""
    from sftok.train import stage3
    from sftok.train.masking import build_proxy_inputs

    cfg = stages_mod.stage_config(_cfg(), "stage3")
    assert cfg.train.stage3.replacement == "sfvr" and cfg.train.stage3.replace_ratio == 1.0
    task = stage3.PixelTask(cfg, smoke_teacher, torch.device("cpu"), init=stage1.checkpoint)
    seen = []

    def spy(targets, masked, mask_id, strategy, ratio, first_step_fn, generator):
        out = build_proxy_inputs(targets, masked, mask_id, strategy, ratio, first_step_fn,
                                 generator)
        with torch.no_grad():
            step1 = first_step_fn(torch.full_like(targets, mask_id)).argmax(-1)
        seen.append((out, step1))
        return out

    monkeypatch.setattr(stage3, "build_proxy_inputs", lambda *a, **k: spy(*a, **k))
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    task.step([images], step=0)
    (proxy, step1), = seen
    visible = ~proxy.masked
    assert visible.any() and proxy.masked.any()  # random arccos masks, not all-masked input
    assert torch.equal(proxy.ids[visible], step1[visible])
    assert (proxy.ids[proxy.masked] == task.model.mask_id).all()


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_resume_is_bitwise_identical(tmp_path, smoke_teacher, stage1, stage):
    sets = {f"train.{stage}.steps": 4, f"train.{stage}.ckpt_every": 2,
            f"train.{stage}.log_every": 1}
    if stage == "stage3":
        sets.update({"train.stage3.grad_accum": 2})  # exercise accumulation + GAN + LeCam
    cfg = _cfg(**sets)
    full = train_stage(cfg, stage, smoke_teacher, tmp_path / "full", init=stage1.checkpoint)

    def crash(step, metrics):
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        train_stage(cfg, stage, smoke_teacher, tmp_path / "resumed", init=stage1.checkpoint,
                    callback=crash)
    assert (tmp_path / "resumed" / "step_00000002" / "state.json").exists()
    resumed = train_stage(cfg, stage, smoke_teacher, tmp_path / "resumed", init=stage1.checkpoint)
    _assert_same(_weights(full.checkpoint), _weights(resumed.checkpoint))  # EMA weights
    last = "step_00000004"
    _assert_same(load_file(str(tmp_path / "full" / last / "model.safetensors")),
                 load_file(str(tmp_path / "resumed" / last / "model.safetensors")))  # raw
    assert full.history[-1]["loss"] == resumed.history[-1]["loss"]


def test_finished_stage_is_not_retrained(workdir, smoke_teacher, stage1, monkeypatch):
    monkeypatch.setattr(stages_mod, "build_stage_task",
                        lambda *a, **k: pytest.fail("a finished stage must not be rebuilt"))
    again = train_stage(_cfg(), "stage1", smoke_teacher, workdir / "stage1")
    assert again.checkpoint == stage1.checkpoint and again.steps == stage1.steps


def test_nan_loss_stops_with_stage_step_and_checkpoint(tmp_path, smoke_teacher, monkeypatch):
    cfg = _cfg(**{"train.stage1.ckpt_every": 2, "train.stage1.steps": 4})
    real = stages_mod.weighted_ce
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(stages_mod, "weighted_ce", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        train_stage(cfg, "stage1", smoke_teacher, tmp_path / "nan")
    e = err.value
    assert (e.stage, e.step) == ("stage1", 3)
    msg = str(e)
    assert "stage1" in msg and "step 3" in msg and "non-finite loss" in msg
    assert str(tmp_path / "nan" / "step_00000002") in msg
    assert not (tmp_path / "nan" / "final").exists()
