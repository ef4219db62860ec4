"""Storage faults lose no finished work and say what happened in one line (issue 21).

A recorded digest for every published result and cache (stage results, trained teachers, floor
palettes, token caches, teacher-id caches): truncated or altered files are detected when opened
and rebuilt (or refused), never used. A full disk names the path and what was being written,
leaves nothing half-written, and `--resume` after freeing space finishes every trial exactly
once. A directory that cannot be written is refused before any compute.

Faults are injected (writes raising ENOSPC, as the kernel does) and, where this machine lets a
test mount one, met for real on a small tmpfs.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from campaign_helpers import ROOT, campaign_runs, plan_for, write_spec
from safetensors import SafetensorError
from safetensors.torch import save_file
from sftok_experiments.campaign import Options, run_campaign
from sftok_experiments.protocol import (
    report_final,
    report_stage_done,
    report_train,
    resolved_config,
    trial_key,
)
from sftok_experiments.stage_store import REUSED, TRAINED, StageStore
from storage_helpers import enospc, mounted_tmpfs, one_line, remount

from sftok import storage
from sftok.config import override
from sftok.presets import get_preset
from sftok.storage import (
    DamagedFileError,
    DamagedFileWarning,
    StorageFullError,
    StorageNotWritableError,
    check_writable,
    disk_full,
    open_tensors,
    publish_tensors,
    writing,
)
from sftok.train.stages import stage_identity, stage_key

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # fake trials below


# --------------------------------------------------------------------------------------------
# sftok.storage
# --------------------------------------------------------------------------------------------


def test_storage_errors_are_one_line_and_survive_pickling(tmp_path):
    for exc in (StorageFullError(tmp_path / "x", "a token cache", ""),
                StorageNotWritableError(tmp_path, "the work dir", "Read-only file system"),
                DamagedFileError(tmp_path / "y", "stage result s", "file missing")):
        assert one_line(exc) and str(tmp_path) in str(exc)
        for back in (pickle.loads(pickle.dumps(exc)), copy.copy(exc)):
            assert type(back) is type(exc) and str(back) == str(exc)


def test_published_tensors_are_checked_when_opened(tmp_path):
    path = tmp_path / "c.safetensors"
    ids = torch.arange(1000, dtype=torch.int32).view(100, 10)
    publish_tensors(path, {"ids": ids}, {"pool": "p"}, "a teacher-id cache")
    t, meta = open_tensors(path, "a teacher-id cache")
    assert torch.equal(t["ids"], ids) and meta["pool"] == "p"
    data = path.read_bytes()
    cases = {"truncated": data[: len(data) - 7], "altered": data[:-4] + b"\x01\x02\x03\x04"}
    for name, content in cases.items():
        path.write_bytes(content)
        with pytest.raises(DamagedFileError) as err:
            open_tensors(path, "a teacher-id cache")
        assert one_line(err.value) and str(path) in str(err.value)
        assert ("unreadable" if name == "truncated" else "does not match") in str(err.value)
    save_file({"ids": ids}, str(path))  # a file from before digests
    with pytest.raises(DamagedFileError, match="no digest recorded"):
        open_tensors(path, "a teacher-id cache")


def test_a_full_disk_while_publishing_leaves_the_old_file_and_no_temporary(tmp_path,
                                                                          monkeypatch):
    path = tmp_path / "tokens.safetensors"
    publish_tensors(path, {"t": torch.zeros(4)}, None, "a token cache")

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what a write cut short leaves
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(storage, "save_file", half_then_full)
    with pytest.raises(StorageFullError) as err:
        publish_tensors(path, {"t": torch.ones(4)}, None, "a token cache")
    assert str(err.value) == (f"no space left on the device of {path} while writing a token "
                              "cache; nothing half-written was kept — free space there and "
                              "run again")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary
    assert torch.equal(open_tensors(path, "a token cache")[0]["t"], torch.zeros(4))


def test_disk_full_is_recognised_in_its_disguises(tmp_path, monkeypatch):
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert disk_full(SafetensorError("I/O error: No space left on device (os error 28)"))
    cryptic = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not disk_full(cryptic, tmp_path)  # plenty of space: not a full disk
    monkeypatch.setattr(storage, "_free_bytes", lambda p: 0)
    assert disk_full(cryptic, tmp_path)  # torch's zip writer on a full disk
    assert not disk_full(ValueError("a bug"), tmp_path) and not disk_full(cryptic)


def test_a_real_full_tmpfs(tmp_path):
    """On a 256 KiB tmpfs: a 1 MB publish fails with StorageFullError and frees what it wrote;
    torch.save's cryptic error on the full disk is recognised; a full directory is refused."""
    with mounted_tmpfs(tmp_path / "full", "256k") as d:
        with pytest.raises(StorageFullError, match="while writing a floor palette"):
            publish_tensors(d / "p.safetensors", {"x": torch.zeros(250_000)}, None,
                            "a floor palette")
        assert os.listdir(d) == []
        (d / "ballast").write_bytes(b"\0" * (256 * 1024 - 8192))
        with contextlib.suppress(OSError), open(d / "ballast", "ab") as f:
            f.write(b"\0" * 65536)  # fill it to the last block
        with pytest.raises(StorageFullError, match="checkpoint state"), \
                writing(d, "checkpoint state"):
            torch.save({"x": torch.zeros(100_000)}, d / "state.pt")
        with pytest.raises(StorageFullError, match="before any work started"):
            check_writable(d / "sub", "the work dir")


def test_a_copy_onto_a_full_disk_names_the_destination(tmp_path):
    """shutil's copy (MLflow's artifact upload) puts the source in `filename` and the
    destination in `filename2`: the full one is the destination."""
    src = tmp_path / "grid.png"
    src.write_bytes(os.urandom(512 * 1024))
    with mounted_tmpfs(tmp_path / "full", "256k") as d:
        with pytest.raises(StorageFullError) as got, writing(d, "the MLflow store"):
            shutil.copyfile(src, d / "grid.png")
    assert str(got.value).startswith(f"no space left on the device of {d / 'grid.png'} while "
                                     "writing the MLflow store")


def test_an_unwritable_directory_is_refused(read_only_dir):
    with pytest.raises(StorageNotWritableError) as err:
        check_writable(read_only_dir / "runs", "the work dir (--work-dir)")
    assert one_line(err.value)
    assert str(err.value).startswith(f"cannot write to {read_only_dir / 'runs'} (the work dir "
                                     "(--work-dir)): ")


# --------------------------------------------------------------------------------------------
# The stage store
# --------------------------------------------------------------------------------------------


def fake_train(calls: list):
    """A train_fn writing a small final result (model + stage.json), as train_stage would."""
    def train(cfg, stage, teacher, out_dir, init=None, callback=None, resume=True,
              step_offset=0, id_cache_dir=None):
        calls.append(stage)
        final = Path(out_dir) / "final"
        final.mkdir(parents=True)
        save_file({"w": torch.full((64,), float(len(calls)))}, str(final / "model.safetensors"))
        (final / "stage.json").write_text(json.dumps({"steps": 3, "metrics": {}, "history": []}))

    return train


def test_a_damaged_stage_result_is_set_aside_and_trained_again(tmp_path):
    store, cfg, calls, said = StageStore(tmp_path / "stages"), get_preset("smoke"), [], []
    get = lambda: store.obtain(cfg, "stage1", None, train_fn=fake_train(calls),
                               echo=said.append)
    first = get()
    assert first.source == TRAINED and (first.checkpoint / "digests.json").is_file()
    assert get().source == REUSED and calls == ["stage1"]
    model = first.checkpoint / "model.safetensors"
    size = model.stat().st_size
    for damage in ("truncate", "alter"):
        data = model.read_bytes()
        model.write_bytes(data[: size // 2] if damage == "truncate"
                          else data[:-1] + bytes([data[-1] ^ 1]))
        out = get()
        assert out.source == TRAINED and len(calls) == (2 if damage == "truncate" else 3)
        line = said[-1]
        assert one_line(line) and line.startswith(f"warning: stage result {first.key} at {model}")
        assert ("truncated" if damage == "truncate" else "does not match") in line
        assert "training it again" in line
        model = out.checkpoint / "model.safetensors"
    assert len(list((tmp_path / "stages" / ".damaged").iterdir())) == 2


def test_a_full_disk_mid_stage_keeps_its_checkpoints_and_resumes_exactly(tmp_path, monkeypatch,
                                                                         smoke_teacher):
    """The step-2 checkpoint is written, the step-3 one meets a full disk: one line naming the
    result; the cut-short temporary is removed, nothing is published; after freeing space the
    stage continues from step 2 and ends bitwise equal to an uninterrupted run."""
    from test_train_stages import _assert_same, _weights  # tests/ is on sys.path (rootdir)

    from sftok.train import checkpointing

    cfg = override(get_preset("smoke"), {"train.stage1.ckpt_every": 2})
    store = StageStore(tmp_path / "stages")
    key = stage_key(stage_identity(cfg, "stage1", None))
    real = checkpointing.save_file

    def full_at_step_3(tensors, filename, metadata=None):
        if "step_00000003" in str(filename):
            enospc()
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpointing, "save_file", full_at_step_3)
    with pytest.raises(StorageFullError) as err:
        store.obtain(cfg, "stage1", smoke_teacher)
    building = tmp_path / "stages" / ".building" / key
    assert str(err.value).startswith(f"no space left on the device of {building} while writing "
                                     f"stage result {key} (training checkpoints and final model)")
    assert sorted(p.name for p in building.iterdir()) == ["step_00000002"]
    assert not store.is_published(key)
    monkeypatch.undo()  # space freed
    steps = []
    out = store.obtain(cfg, "stage1", smoke_teacher, callback=lambda s, m: steps.append(s))
    assert out.source == TRAINED and steps == [1, 2, 3]  # 1-2 replayed, 3 trained now
    ref = StageStore(tmp_path / "alone").obtain(cfg, "stage1", smoke_teacher)
    _assert_same(_weights(out.checkpoint), _weights(ref.checkpoint))


# --------------------------------------------------------------------------------------------
# The teacher cache, palettes, token caches, teacher-id caches
# --------------------------------------------------------------------------------------------


def test_teacher_cache_entry_digest_legacy_damage_and_full_disk(tmp_path, monkeypatch):
    from sftok.train import teacher_stage
    from sftok.train.teacher_stage import get_teacher, teacher_cache_key, teacher_info

    cfg, cache = get_preset("smoke"), tmp_path / "teachers"
    entry = cache / teacher_cache_key(cfg)
    # A full disk at the publish: one line, nothing published, the training kept.
    monkeypatch.setattr(teacher_stage, "save_model", enospc)
    with pytest.raises(StorageFullError) as err:
        get_teacher(cfg, cache)
    assert one_line(err.value) and str(err.value).startswith(
        f"no space left on the device of {entry} while writing the teacher (stage 0) cache "
        f"entry {entry.name}")
    assert not (entry / "teacher.json").exists()
    assert not [p for p in (entry / "train").iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.undo()
    steps = []
    get_teacher(cfg, cache, callback=lambda s, m: steps.append((s, sorted(m))))
    assert steps == [(cfg.train.teacher.steps, ["val_psnr"])]  # no step trained again
    files = teacher_info(entry)["files"]
    assert files["model.safetensors"]["bytes"] == (entry / "model.safetensors").stat().st_size
    # An entry from before digests: opened (it loads), then given its digests.
    record = teacher_info(entry)
    del record["files"]
    (entry / "teacher.json").write_text(json.dumps(record))
    get_teacher(cfg, cache, train_if_missing=False)
    assert teacher_info(entry)["files"] == files
    # Truncated weights: a trial refuses them in one line; the driver sets them aside, trains.
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DamagedFileError) as err:
        get_teacher(cfg, cache, train_if_missing=False)
    assert one_line(err.value) and f"teacher cache entry {entry.name} at {weights}" in \
        str(err.value) and "run the campaign again" in str(err.value)
    with pytest.warns(DamagedFileWarning, match="moved to .*training it again"):
        teacher = get_teacher(cfg, cache)
    assert teacher.codebook_size == cfg.teacher.codebook_size
    assert teacher_info(entry)["files"]["model.safetensors"]["bytes"] == weights.stat().st_size
    assert len(list((cache / ".damaged").iterdir())) == 1


def test_an_unwritable_cache_dir_is_refused_before_the_teacher_trains(read_only_dir,
                                                                       monkeypatch):
    from sftok.train import teacher_stage

    monkeypatch.setattr(teacher_stage, "train_teacher",
                        lambda *a, **k: pytest.fail("trained before checking the cache dir"))
    with pytest.raises(StorageNotWritableError, match="the teacher cache"):
        teacher_stage.get_teacher(get_preset("smoke"), read_only_dir / "teachers")


def _flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x10]))


def test_a_damaged_floor_palette_is_fitted_again(tmp_path):
    from sftok.evaluate.bounds import floor_codecs

    cfg = get_preset("smoke")
    first = floor_codecs(cfg, tmp_path, images=16)
    files = sorted((tmp_path / "floor_palettes").glob("*.safetensors"))
    assert len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:50])
    _flip_last_byte(files[1])
    with pytest.warns(DamagedFileWarning) as caught:
        again = floor_codecs(cfg, tmp_path, images=16)
    assert len(caught) == 2 and all("fitting it again" in str(w.message) for w in caught)
    for name in first:
        assert torch.equal(first[name].palette, again[name].palette)
    for f in files:
        open_tensors(f, "floor palette")  # whole again


def test_a_damaged_token_cache_and_teacher_id_cache_are_rebuilt(tmp_path):
    from sftok.checkpoint import save_model
    from sftok.config import proxy_grid
    from sftok.data import build_train_dataset
    from sftok.generation.pretokenize import cached_tokens
    from sftok.teacher import FrozenTeacher, MaskGitVQGAN
    from sftok.tokenizer import SFTok
    from sftok.train.teacher_ids import TeacherIdCache

    cfg = get_preset("smoke")
    torch.manual_seed(0)
    tok = SFTok(cfg.tokenizer, cfg.teacher.codebook_size, proxy_grid(cfg), cfg.teacher).eval()
    ckpt = save_model(tmp_path / "tok", tok, cfg)
    ds = build_train_dataset(cfg.data)
    ts, hit = cached_tokens(tok, ckpt, ds, "smoke", tmp_path, batch_size=8)
    (file,) = (tmp_path / "tokens").iterdir()
    _flip_last_byte(file)
    with pytest.warns(DamagedFileWarning, match="token cache .* does not match"):
        again, hit = cached_tokens(tok, ckpt, ds, "smoke", tmp_path, batch_size=8)
    assert not hit and torch.equal(again.tokens, ts.tokens)
    assert cached_tokens(tok, ckpt, ds, "smoke", tmp_path, batch_size=8)[1]  # whole again

    teacher = FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size)
    ids_dir = tmp_path / "ids"
    built = TeacherIdCache.load_or_build(teacher, ds, ids_dir, "t0")
    (file,) = ids_dir.iterdir()
    file.write_bytes(file.read_bytes()[:200])
    with pytest.warns(DamagedFileWarning, match="teacher-id cache .* unreadable"):
        rebuilt = TeacherIdCache.load_or_build(teacher, ds, ids_dir, "t0")
    assert torch.equal(rebuilt.ids, built.ids) and torch.equal(rebuilt.digests, built.digests)
    open_tensors(file, "teacher-id cache")


# --------------------------------------------------------------------------------------------
# Campaigns: refused before compute; a full disk, then --resume
# --------------------------------------------------------------------------------------------


def spec_file(tmp_path: Path, name: str) -> Path:
    return write_spec(tmp_path, name, max_failures=1)  # a retry would be allowed


@pytest.mark.parametrize("which", ["work", "cache"])
def test_an_unwritable_work_or_cache_dir_is_refused_before_anything(tmp_path, read_only_dir,
                                                                    which, capsys):
    store = tmp_path / f"store-{which}"
    dirs = {"work_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")}
    dirs[f"{which}_dir"] = str(read_only_dir / which)
    res = run_campaign(plan_for(spec_file(tmp_path, f"ro_{which}")),
                       Options(tracking=str(store), prepare_teacher=False, **dirs,
                               trial_fn=lambda config: pytest.fail("a trial ran")))
    err = capsys.readouterr().err.strip()
    assert res.exit_code == 1 and one_line(err)
    assert err.startswith(f"error: StorageNotWritableError: cannot write to {read_only_dir / which}"
                          f" (the {which} dir (--{which}-dir)): ")
    assert not (store / "mlflow.db").exists()  # nothing recorded either


def make_fake(log_dir: Path, full_flag: Path):
    """A trial whose stages go through the real StageStore (fake training); while `full_flag`
    exists, writing the stage-2 result of replace_ratio 0.8 meets a full disk. Every start and
    every final report leaves a marker in log_dir."""
    log_dir, full_flag = str(log_dir), str(full_flag)

    def fake_trial(config):
        key = trial_key(config)
        cfg = resolved_config(config)
        Path(log_dir, f"start.{key}.{time.time_ns()}").write_text("")
        store = StageStore(config["runtime"]["stage_store"])

        def train(cfg, stage, teacher, out_dir, init=None, callback=None, **_):
            tmp = Path(out_dir) / f".tmp-final-{os.getpid()}"  # as run_loop: tmp, then rename
            tmp.mkdir(parents=True, exist_ok=True)
            if stage == "stage2" and cfg.train.stage2.replace_ratio == 0.8 and \
                    Path(full_flag).exists():
                (tmp / "model.safetensors").write_bytes(b"\0" * 10)  # cut short
                raise OSError(errno.ENOSPC, "No space left on device")
            save_file({"w": torch.zeros(8)}, str(tmp / "model.safetensors"))
            (tmp / "stage.json").write_text('{"steps": 2, "metrics": {}, "history": []}')
            callback(2, {"loss": 0.5})
            os.rename(tmp, Path(out_dir) / "final")

        prev, step = None, 0
        for stage in config["trial"]["stages"]:
            prev = store.obtain(cfg, stage, None, init=prev, step_offset=step, train_fn=train,
                                callback=lambda s, m, st=stage: report_train(st, s, m))
            step += prev.steps
            report_stage_done(stage, step, source=prev.source, key=prev.key, steps=prev.steps)
        out = Path(tempfile.mkdtemp()) / "artifacts"
        out.mkdir()
        (out / "eval.json").write_text("{}")
        Path(log_dir, f"final.{key}.{time.time_ns()}").write_text("")
        report_final({"psnr_s1": 1.0}, out)

    return fake_trial


def markers(log_dir: Path, kind: str) -> list[str]:
    return sorted(p.name.split(".", 1)[1].rsplit(".", 1)[0] for p in log_dir.glob(f"{kind}.*"))


def test_a_full_disk_in_a_trial_then_resume_finishes_each_trial_once(ray_session, store, client,
                                                                    tmp_path, capsys):
    logs, flag = tmp_path / "logs", tmp_path / "disk-full"
    logs.mkdir()
    flag.touch()
    plan = plan_for(spec_file(tmp_path, "full_in_trial"))
    opts = {"tracking": str(store), "work_dir": str(tmp_path / "runs"), "prepare_teacher": False,
            "trial_fn": make_fake(logs, flag)}
    res = run_campaign(plan, Options(**opts))
    out = capsys.readouterr()
    assert res.exit_code == 1
    failed = "replace_ratio=0.8_s0"
    assert markers(logs, "start").count(failed) == 1  # not retried: a full disk stays full
    assert markers(logs, "final") == ["replace_ratio=0.5_s0", "replace_ratio=1.0_s0"]
    line = next(ln for ln in out.out.splitlines() if f"trial {failed}" in ln and "FAILED" in ln)
    building = tmp_path / "runs" / "stages" / ".building"
    assert f"FAILED: StorageFullError: no space left on the device of {building}/stage2-" in line
    assert "continue with: " in out.err
    stages = tmp_path / "runs" / "stages"
    published = sorted(p.name for p in stages.iterdir() if not p.name.startswith("."))
    assert len(published) == 3  # stage 1 (shared) + two stage-2 results; nothing half-written
    assert all(StageStore(stages).published(k) is not None for k in published)
    assert not list((stages / ".building").glob("*/.tmp-*"))  # the cut-short write is gone

    flag.unlink()  # space freed
    res = run_campaign(plan, Options(resume=True, **opts))
    assert res.exit_code == 0
    assert markers(logs, "final").count(failed) == 1
    assert sorted(markers(logs, "final")) == sorted(t.key for t in plan.trials)  # once each
    _, children = campaign_runs(client, "full_in_trial")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert "error" not in next(c for c in children
                               if c.data.tags["trial_key"] == failed).data.tags


def test_a_full_cache_disk_while_the_driver_trains_the_teacher(ray_session, store, client,
                                                               tmp_path, monkeypatch, capsys):
    from sftok.train import teacher_stage

    logs, flag = tmp_path / "logs", tmp_path / "never"
    logs.mkdir()
    plan = plan_for(spec_file(tmp_path, "full_teacher"))
    opts = {"tracking": str(store), "work_dir": str(tmp_path / "runs"),
            "cache_dir": str(tmp_path / "cache"), "trial_fn": make_fake(logs, flag)}
    monkeypatch.setattr(teacher_stage, "save_model", enospc)
    res = run_campaign(plan, Options(**opts))
    err = capsys.readouterr().err
    assert res.exit_code == 1 and markers(logs, "start") == []
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert line.startswith("error: preparing the trials (stage 0 teacher, floors) failed, no "
                           f"trial started: StorageFullError: no space left on the device of "
                           f"{tmp_path / 'cache' / 'teachers'}/teacher-")
    monkeypatch.undo()
    res = run_campaign(plan, Options(resume=True, **opts))
    assert res.exit_code == 0
    assert sorted(markers(logs, "final")) == sorted(t.key for t in plan.trials)


@pytest.mark.slow
def test_the_real_pipeline_on_a_full_tmpfs_then_resume(tmp_path):
    """`run.py ablation_replace_ratio --preset smoke` with its work dir on a 600 KiB tmpfs:
    every trial stops with the one-line full-disk error; grown to 64 MiB (space freed),
    `--resume` finishes each trial exactly once in its own child run."""
    with mounted_tmpfs(tmp_path / "full", "600k") as work:
        store = tmp_path / "store"
        cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "ablation_replace_ratio",
               "--preset", "smoke", "--seeds", "1", "--progress-every", "-1",
               "--tracking-uri", str(store), "--work-dir", str(work / "runs"),
               "--cache-dir", str(tmp_path / "cache")]
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
        assert "StorageFullError: no space left on the device of " in first.stdout
        remount(work, "64m")
        again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900,
                               check=False)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert again.stdout.count(" FINISHED ") >= 3
    from sftok_experiments.tracking import open_store

    parents, children = campaign_runs(open_store(str(store))[0], "ablation_replace_ratio")
    assert len(parents) == 1
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["trial_key"] for c in children}) == 3
