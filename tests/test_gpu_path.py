"""The GPU-path choices (issue 22 part 3), tested on CPU: fused AdamW on CUDA only, the
torch.compile fallback to eager with one warning line, pinned batches only when asked (CUDA),
persistent DataLoader workers, TF32 at CUDA set-up. The device check
(`scripts/device_check.py`, step `gpu_path`) checks the same on a real GPU."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from sftok.config import OptimConfig, override
from sftok.data import stream as stream_mod
from sftok.data.stream import TrainStream, loader_options
from sftok.presets import get_preset
from sftok.teacher import FrozenTeacher, MaskGitVQGAN
from sftok.train.loop import CompileFallbackWarning, compile_children, resolve_device
from sftok.train.optim import build_optimizer, fused_adamw
from sftok.train.stages import build_stage_task


def test_fused_adamw_on_cuda_only():
    assert fused_adamw("cuda") is True and fused_adamw(torch.device("cuda:1")) is True
    assert fused_adamw("cpu") is None and fused_adamw(None) is None
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(), torch.device("cpu"))
    assert not opt.defaults["fused"]


def _stage2(cfg=None):
    cfg = cfg or get_preset("smoke")
    torch.manual_seed(0)
    teacher = FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size)
    return build_stage_task(cfg, "stage2", teacher, torch.device("cpu"))


BATCHES = [(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
            torch.zeros(4, dtype=torch.long))]


def _two_steps(task) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in task.step(BATCHES, i).items()} for i in range(2)]


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no compiler here\n(a second line of detail)")


def test_compile_failure_falls_back_to_eager_with_one_warning():
    eager = _two_steps(_stage2())
    task = _stage2()
    keys = list(task.model.state_dict())
    compile_children(task.model, backend=_broken_backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fell_back = _two_steps(task)
    fallback = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    msg = str(fallback[0].message)
    assert "\n" not in msg and "no compiler here" in msg and "eager" in msg
    assert fell_back == eager  # the same numbers as never compiling
    assert list(task.model.state_dict()) == keys


def test_compile_fallback_keeps_genuine_errors():
    """An error that eager mode raises too is the caller's, not the compiler's: it propagates
    (from the eager run) and the model stays compiled."""
    task = _stage2()
    compile_children(task.model, backend=_broken_backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError) as err:
            task.model.encoder(torch.rand(2, 5, 16, 16))  # 5 channels: the conv refuses
    assert "no compiler here" not in str(err.value)
    assert not [w for w in caught if issubclass(w.category, CompileFallbackWarning)]


def test_compiled_children_match_eager_and_copies_use_their_own_weights():
    """A working backend (dynamo with the `eager` backend: no C++ compiler needed) gives the
    eager numbers without a warning, and a deep copy (the EMA export) computes with its own
    weights, not the original's."""
    eager = _two_steps(_stage2())
    task = _stage2()
    compile_children(task.model, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _two_steps(task)
    assert not [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    for c, e in zip(compiled, eager, strict=True):
        assert c == pytest.approx(e, rel=1e-6)
    images = BATCHES[0][0]
    with torch.no_grad():
        before = task.model.encoder(images)
        twin = copy.deepcopy(task.model)
        for p in twin.encoder.parameters():
            p.zero_()
        assert torch.equal(task.model.encoder(images), before)
        assert not torch.equal(twin.encoder(images), before)


def test_loader_options_persist_workers_and_pin_only_when_asked():
    assert loader_options(0) == {"num_workers": 0, "persistent_workers": False,
                                 "pin_memory": False}
    assert loader_options(4, pin_memory=True) == {"num_workers": 4, "persistent_workers": True,
                                                  "pin_memory": True}


class _Pool(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), i


def test_stream_pins_its_batches_when_asked(monkeypatch):
    """With pin_memory (a CUDA device) the stream hands out pinned batches; pinning needs a
    driver, so here `pin_memory` is recorded instead of done."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda t, *a, **k: pinned.append(tuple(t.shape)) or t)
    next(TrainStream(_Pool(), 2, seed=0, pin_memory=False))
    assert pinned == []
    images, _ = next(TrainStream(_Pool(), 2, seed=0, pin_memory=True))
    assert pinned == [(2, 3, 4, 4), (2,)] and images.shape == (2, 3, 4, 4)


def test_stream_with_workers_lets_the_loader_pin_and_persist(monkeypatch):
    seen = {}
    real = stream_mod.DataLoader

    def recording(*a, **k):
        seen.update(k)
        return real(*a, **{**k, "pin_memory": False})  # no driver here

    pinned = []
    monkeypatch.setattr(stream_mod, "DataLoader", recording)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(1) or t)
    stream = TrainStream(_Pool(), 2, seed=0, num_workers=1, pin_memory=True)
    next(stream)
    assert seen["persistent_workers"] is True and seen["pin_memory"] is True
    assert seen["num_workers"] == 1
    assert pinned == []  # the loader's pinning thread does it, not the stream again
    stream.load_state_dict(stream.state_dict())  # close the worker


def test_cuda_set_up_turns_tf32_on_and_cpu_leaves_it():
    """resolve_device('cuda...') needs no GPU to set the flags (nothing touches the device)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert resolve_device("cpu").type == "cpu"
        assert not torch.backends.cuda.matmul.allow_tf32
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_stage_tasks_compile_through_the_guarded_path(monkeypatch):
    """`train.<stage>.compile` goes through `compile_children` (so it gets the fallback)."""
    from sftok.train import stages

    called = []
    monkeypatch.setattr(stages, "compile_children", lambda model: called.append(model))
    task = _stage2(override(get_preset("smoke"), {"train.stage2.compile": True}))
    assert called == [task.model]
