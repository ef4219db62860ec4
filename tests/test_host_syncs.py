"""No host syncs on the hot path (issue 10): a stage-1/2 training step and a decode step read
no tensor back to Python. On a GPU every such read (`float(t)`, `int(t)`, `bool(t)`, `.item()`,
`.tolist()`) stalls the launch queue; on CPU they are free, so the test counts the reads made
by the library's own code (torch internals, e.g. AdamW's step counter on the host, are not
device syncs and are not counted). Also: a non-finite loss or gradient norm found by the
deferred check still stops the stage at the right step, before any checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import sftok
from sftok.config import DecodeConfig, override
from sftok.decoding import decode
from sftok.presets import get_preset
from sftok.teacher import FrozenTeacher, MaskGitVQGAN
from sftok.train import NonFiniteLossError
from sftok.train import stages as stages_mod
from sftok.train.loop import FiniteWatch, Ratio

LIB = str(Path(sftok.__file__).resolve().parent)
READS = ("__float__", "__int__", "__bool__", "__index__", "item", "tolist")


@pytest.fixture
def reads(monkeypatch):
    """Count tensor reads whose caller is a file of the sftok package."""
    calls: list[str] = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(LIB):
                calls.append(f"{_name} in {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def _teacher(cfg) -> FrozenTeacher:
    torch.manual_seed(0)
    return FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size)


@pytest.mark.parametrize("stage,accum", [("stage1", 1), ("stage2", 2)])
def test_token_step_reads_nothing_back(reads, stage, accum):
    cfg = override(get_preset("smoke"), {f"train.{stage}.grad_accum": accum})
    teacher = _teacher(cfg)
    task = stages_mod.build_stage_task(cfg, stage, teacher, torch.device("cpu"))
    batches = [(torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
               for _ in range(accum)]
    reads.clear()
    out = task.step(batches, 0)
    assert reads == []
    # 0-dim device tensors, or Ratios of two (summed over ranks before the division)
    parts = [p for k, v in out.items() if k != "lr"
             for p in (v if isinstance(v, Ratio) else (v,))]
    assert all(isinstance(p, torch.Tensor) and p.ndim == 0 for p in parts)
    assert set(task.finite_keys) == {"loss", "grad_norm"}


def test_decode_reads_nothing_back_per_step(reads):
    logits = torch.randn(2, 16, 8)
    res = decode(lambda ids: logits, 2, 16, 8, DecodeConfig(steps=4))
    assert reads == [] and not (res.ids == 8).any()


def test_finite_watch_keeps_the_first_bad_value():
    w = FiniteWatch()
    w.observe(1, {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(2.0)})
    assert w.first() is None
    w.observe(2, {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(float("inf"))})
    w.observe(3, {"loss": torch.tensor(float("nan")), "grad_norm": torch.tensor(1.0)})
    assert w.first() == (2, "grad_norm", float("inf"))


def test_nonfinite_grad_norm_stops_before_a_checkpoint(tmp_path, monkeypatch):
    cfg = override(get_preset("smoke"), {"train.stage1.steps": 4, "train.stage1.ckpt_every": 2,
                                         "train.stage1.log_every": 4})
    real = stages_mod.clip_and_step_async
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        norm = real(*a, **k)
        return norm * float("nan") if calls["n"] == 2 else norm

    monkeypatch.setattr(stages_mod, "clip_and_step_async", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        stages_mod.train_stage(cfg, "stage1", _teacher(cfg), tmp_path / "s1")
    e = err.value
    # Found at the step-2 checkpoint boundary (log_every is 4), reported at step 2, and the
    # step-2 checkpoint was not written.
    assert (e.step, e.name) == (2, "grad_norm")
    assert not (tmp_path / "s1" / "step_00000002").exists()
