"""Content-addressed stage results (issue 10): the identity of a stage result, training each
distinct one once, reuse giving bitwise the same weights as training per trial, the replayed
curves, two concurrent trainers, and a trainer killed mid-stage (its lock dies with it).
Smoke preset, no Ray; the campaign-level counts are checked in test_runner's smoke test."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from campaign_helpers import RATIOS, ROOT
from sftok_experiments.stage_store import REUSED, TRAINED, StageStore
from test_train_stages import _assert_same, _weights

from sftok.config import override
from sftok.presets import get_preset
from sftok.train import train_stage
from sftok.train.stages import stage_identity, stage_key


def _cfg(**sets):
    return override(get_preset("smoke"), sets) if sets else get_preset("smoke")


def _arm(ratio: float):
    return _cfg(**{"train.stage2.replace_ratio": ratio})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage-store")


def _run(store: StageStore, cfg, smoke_teacher, stages=("stage1", "stage2")):
    """One trial's stage pipeline; returns (outcomes, callback calls per stage)."""
    outs, calls, prev, offset = [], {}, None, 0
    for stage in stages:
        log = calls.setdefault(stage, [])
        prev = store.obtain(cfg, stage, smoke_teacher, init=prev, step_offset=offset,
                            callback=lambda step, m, _log=log: _log.append((step, m)))
        offset += prev.steps
        outs.append(prev)
    return outs, calls


def test_identity_covers_what_the_stage_depends_on():
    base = stage_key(stage_identity(_cfg(), "stage1", None))
    # A later stage's knob, evaluation, decoding and cadence do not change stage 1's result ...
    same = {"train.stage2.replace_ratio": 0.5, "eval.max_images": 4, "decode.steps": 2,
            "train.stage1.ckpt_every": 1, "data.num_workers": 1, "device": "cpu"}
    for k, v in same.items():
        assert stage_key(stage_identity(_cfg(**{k: v}), "stage1", None)) == base, k
    # ... its own config, the model, the data, the teacher, the seed and its start do.
    differ = {"train.stage1.steps": 4, "train.stage1.optim.lr": 5e-4, "seed": 1,
              "tokenizer.decoder.depth": 2, "data.seed": 3, "teacher.codebook_size": 32,
              "train.teacher.steps": 5}
    for k, v in differ.items():
        assert stage_key(stage_identity(_cfg(**{k: v}), "stage1", None)) != base, k
    assert stage_key(stage_identity(_cfg(), "stage1", "stage0-x")) != base
    s2 = {r: stage_key(stage_identity(_arm(r), "stage2", base)) for r in RATIOS}
    assert len(set(s2.values())) == 3 and all(k.startswith("stage2-") for k in s2.values())
    with pytest.raises(ValueError, match="unknown stage"):
        stage_identity(_cfg(), "stage9", None)


def test_shared_stage_is_trained_once_and_equals_training_it_per_trial(cache, smoke_teacher):
    shared = StageStore(cache / "shared")
    runs = {r: _run(shared, _arm(r), smoke_teacher) for r in RATIOS}
    sources = [(o.stage, o.source) for outs, _ in runs.values() for o in outs]
    assert sources.count(("stage1", TRAINED)) == 1 and sources.count(("stage1", REUSED)) == 2
    assert sources.count(("stage2", TRAINED)) == 3
    assert len({outs[0].key for outs, _ in runs.values()}) == 1
    published = sorted(p.name for p in shared.root.iterdir() if not p.name.startswith("."))
    assert len(published) == 4 and not any((shared.root / ".building").iterdir())

    for r in RATIOS:  # each trial alone, training everything itself: bitwise the same results
        alone, calls = _run(StageStore(cache / f"alone-{r}"), _arm(r), smoke_teacher)
        assert all(o.source == TRAINED for o in alone)
        outs, shared_calls = runs[r]
        for a, b in zip(alone, outs):
            assert a.key == b.key and a.steps == b.steps
            _assert_same(_weights(a.checkpoint), _weights(b.checkpoint))
        # The reused stage-1 curve is the trained one (images_per_s is a timing, not replayed
        # bit for bit), at the same global steps; stage 2 continues after it.
        for stage in ("stage1", "stage2"):
            strip = lambda c: [(s, {k: v for k, v in m.items() if k != "images_per_s"})
                               for s, m in c]
            assert strip(shared_calls[stage]) == strip(calls[stage])
        assert calls["stage2"][0][0] == outs[0].steps + 1


def test_windows_trained_before_go_to_the_replay_callback(cache, smoke_teacher):
    """A trial that reuses a result sees its curve through `replay_callback` only (the runner
    reports those windows as replayed: no progress line for them, issue 20 item 5)."""
    store = StageStore(cache / "replay")
    live, replayed = [], []
    kw = {"callback": lambda s, m: live.append(s),
          "replay_callback": lambda s, m: replayed.append(s)}
    first = store.obtain(_cfg(), "stage1", smoke_teacher, **kw)
    assert first.source == TRAINED and live == [1, 2, 3] and replayed == []
    live.clear()
    again = store.obtain(_cfg(), "stage1", smoke_teacher, step_offset=10, **kw)
    assert again.source == REUSED and live == [] and replayed == [11, 12, 13]


def test_concurrent_trainers_train_a_result_once(cache, smoke_teacher):
    store = StageStore(cache / "concurrent")
    started, release, trained = threading.Event(), threading.Event(), []

    def slow_train(*args, **kwargs):
        trained.append(1)
        started.set()
        release.wait(60)  # hold the lock until the second trainer is waiting on it
        return train_stage(*args, **kwargs)

    results, waits = {}, []

    def trial(name):
        results[name] = store.obtain(_cfg(), "stage1", smoke_teacher, train_fn=slow_train,
                                     echo=waits.append)

    a = threading.Thread(target=trial, args=("a",))
    a.start()
    assert started.wait(60)
    b = threading.Thread(target=trial, args=("b",))
    b.start()
    for _ in range(600):  # until b reports that it waits
        if waits:
            break
        threading.Event().wait(0.05)
    release.set()
    a.join(120)
    b.join(120)
    assert len(trained) == 1
    assert sorted(o.source for o in results.values()) == [REUSED, TRAINED]
    assert waits and "being trained by pid" in waits[0]


KILLER = textwrap.dedent("""
    import os, signal
    from pathlib import Path
    from sftok.presets import get_preset
    from sftok.train import get_teacher
    from sftok_experiments.stage_store import StageStore

    cfg = get_preset("smoke")
    teacher = get_teacher(cfg, Path({teachers!r}), train_if_missing=False)

    def cb(step, metrics):
        if step == 2:  # after the step-2 checkpoint: die holding the lock
            os.kill(os.getpid(), signal.SIGKILL)

    StageStore({root!r}).obtain(cfg, "stage1", teacher, callback=cb)
""")


def test_trainer_killed_mid_stage_is_resumed_by_the_next(cache, smoke_teacher_run,
                                                         smoke_teacher):
    root = cache / "killed"
    script = KILLER.format(teachers=str(smoke_teacher_run.cache), root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          timeout=300, capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = StageStore(root)
    key = stage_key(stage_identity(_cfg(), "stage1", None))
    assert store.published(key) is None
    assert (root / ".building" / key / "step_00000002").is_dir()
    assert "pid" in (root / ".locks" / f"{key}.lock").read_text()  # the dead holder's lock file

    calls = []
    out = store.obtain(_cfg(), "stage1", smoke_teacher, callback=lambda s, m: calls.append(s))
    assert out.source == TRAINED and [s for s in calls] == [1, 2, 3]  # 1-2 replayed, 3 live
    ref = StageStore(cache / "alone-1.0").obtain(_cfg(), "stage1", smoke_teacher)  # uninterrupted
    _assert_same(_weights(out.checkpoint), _weights(ref.checkpoint))
