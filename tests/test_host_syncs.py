"""No host syncs on the hot path (issues 10, 22): a stage-1/2/3 training step and a decode step
read no tensor back to Python. On a GPU every such read stalls the launch queue; on CPU they
are free, so the tests list them with `sftok.train.syncs.HostReads`, which also counts what
syncs on CUDA without looking like a read: data-dependent ops (`nonzero`, boolean-mask
indexing, `unique`, ...) and device moves without `non_blocking=True` (a host-to-device copy
of a CPU draw waits for the queued kernels). Reads made inside torch (e.g. a CPU AdamW's step
counter) are torch's, not ours, and are not counted; the device check runs the same steps on
CUDA under torch's sync debug mode, which sees those too. Also: a non-finite loss or gradient
norm found by the deferred check still stops the stage at the right step, before any
checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sftok.config import DecodeConfig, override
from sftok.decoding import decode
from sftok.presets import get_preset
from sftok.teacher import FrozenTeacher, MaskGitVQGAN
from sftok.train import NonFiniteLossError
from sftok.train import stages as stages_mod
from sftok.train.loop import FiniteWatch
from sftok.train.syncs import HostReads


def _teacher(cfg) -> FrozenTeacher:
    torch.manual_seed(0)
    return FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size)


def test_host_reads_sees_every_kind_of_sync_made_here():
    """The detector itself: each kind is caught in this file, and nothing else is."""
    x = torch.randn(8)
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with HostReads(root=Path(__file__).parent) as r:
        y = x * 2 + 1  # device-side work: not a read
        torch.nn.utils.clip_grad_norm_([p], 1.0)  # torch's own internals: not ours
        torch.optim.AdamW([p]).step()  # its CPU step counter is read by torch, not by us
        y.to(torch.float64)  # a dtype cast, no device move
        y.to("cpu", non_blocking=True)
    assert r.calls == []
    cases = [lambda: float(x.sum()), lambda: x.sum().item(), lambda: bool(x.sum() > 0),
             lambda: x.tolist(), lambda: x[x > 0], lambda: torch.nonzero(x),
             lambda: torch.unique(x), lambda: torch.where(x > 0), lambda: x.to("cpu"),
             lambda: torch.bincount((x > 0).long(), minlength=2), lambda: x.cpu(),
             lambda: x.masked_select(x > 0)]
    for case in cases:
        with HostReads(root=Path(__file__).parent) as r:
            case()
        assert len(r.calls) >= 1 and all("test_host_syncs.py" in c for c in r.calls), r.calls
    assert torch.Tensor.item is not None and "wrapper" not in torch.Tensor.item.__name__


@pytest.mark.parametrize("stage,sets", [
    ("stage1", {}),
    ("stage2", {"train.stage2.grad_accum": 2}),
    # GAN and LeCam on from the first step, 2 micro-batches: the discriminator's update too
    ("stage3", {"train.stage3.grad_accum": 2, "train.stage3.gan_start": 0,
                "train.stage3.gan_weight": 0.5, "train.stage3.lecam_weight": 0.001}),
])
def test_training_step_reads_nothing_back(stage, sets):
    cfg = override(get_preset("smoke"), sets)
    teacher = _teacher(cfg)
    task = stages_mod.build_stage_task(cfg, stage, teacher, torch.device("cpu"))
    accum = getattr(cfg.train, stage).grad_accum
    batches = [(torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
               for _ in range(accum)]
    task.step(batches, 0)  # first step: lazy initialisation (optimiser state) out of the way
    with HostReads() as reads:
        out = task.step(batches, 1)
    assert reads.calls == []
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for k, v in out.items()
               if k not in ("lr", "disc_lr"))
    assert {"loss", "grad_norm"} <= set(task.finite_keys)
    if stage == "stage3":
        assert {"gan_g", "gan_d", "lecam", "disc_grad_norm"} <= set(out)
        assert {"gan_d", "lecam", "disc_grad_norm"} <= set(task.finite_keys)


def test_decode_reads_nothing_back_per_step():
    logits = torch.randn(2, 16, 8)
    with HostReads() as reads:
        res = decode(lambda ids: logits, 2, 16, 8, DecodeConfig(steps=4))
    assert reads.calls == [] and not (res.ids == 8).any()


def test_finite_watch_keeps_the_first_bad_value():
    w = FiniteWatch()
    w.observe(1, {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(2.0)})
    assert w.first() is None
    w.observe(2, {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(float("inf"))})
    w.observe(3, {"loss": torch.tensor(float("nan")), "grad_norm": torch.tensor(1.0)})
    assert w.first() == (2, "grad_norm", float("inf"))


def _poison(monkeypatch, module, name: str, at_call: int) -> None:
    """module.name returns NaN (times its real value) at its at_call-th call."""
    real, calls = getattr(module, name), {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == at_call else out

    monkeypatch.setattr(module, name, poisoned)


def test_nonfinite_grad_norm_stops_before_a_checkpoint(tmp_path, monkeypatch):
    cfg = override(get_preset("smoke"), {"train.stage1.steps": 4, "train.stage1.ckpt_every": 2,
                                         "train.stage1.log_every": 4})
    _poison(monkeypatch, stages_mod, "clip_and_step_async", at_call=2)
    with pytest.raises(NonFiniteLossError) as err:
        stages_mod.train_stage(cfg, "stage1", _teacher(cfg), tmp_path / "s1")
    e = err.value
    # Found at the step-2 checkpoint boundary (log_every is 4), reported at step 2, and the
    # step-2 checkpoint was not written.
    assert (e.step, e.name) == (2, "grad_norm")
    assert not (tmp_path / "s1" / "step_00000002").exists()


def test_nonfinite_discriminator_loss_stops_stage3_at_its_step(tmp_path, monkeypatch):
    """Stage 3 no longer checks on the host per micro-batch: a NaN in the discriminator's hinge
    loss at step 3 is still reported as step 3, and no checkpoint after it is written."""
    from sftok.train import discriminator

    cfg = override(get_preset("smoke"), {
        "train.stage3.steps": 4, "train.stage3.ckpt_every": 2, "train.stage3.log_every": 4,
        "train.stage3.gan_start": 0, "train.stage3.gan_weight": 0.5})
    _poison(monkeypatch, discriminator, "hinge_d", at_call=3)
    with pytest.raises(NonFiniteLossError) as err:
        stages_mod.train_stage(cfg, "stage3", _teacher(cfg), tmp_path / "s3")
    assert (err.value.stage, err.value.step, err.value.name) == ("stage3", 3, "gan_d")
    assert (tmp_path / "s3" / "step_00000002").exists()
    assert not (tmp_path / "s3" / "step_00000004").exists()
