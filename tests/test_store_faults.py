"""Storage faults of the MLflow store lose no finished work and say what happened in one line
(issue 21): a store that cannot be written is refused before any compute; a full store (SQLite's
"database or disk is full", an artifact copy cut short) stops the campaign in one line and
`--resume` after freeing space finishes every trial once, in its own child run; two `--resume`
of one campaign at once: one proceeds, the other says who holds it.

The trials are fakes that speak the runner's protocol (no training); the faults are injected
into MLflow's writes or met for real on a small tmpfs where this machine lets a test mount one.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
from campaign_helpers import ROOT, campaign_runs, plan_for, trial_fn_ref, write_spec
from sftok_experiments import tracking as trk
from sftok_experiments.campaign import DRIVER_LOCK, Options, run_campaign
from sftok_experiments.protocol import report_final, report_train, resolved_config, trial_key
from storage_helpers import mounted_tmpfs, one_line

from sftok import run_record as rr
from sftok.config import to_dict

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # fake trials below

FULL_STORE = "while writing the MLflow store (--tracking-uri); nothing half-written was kept — " \
             "free space there and run again"


def make_fake(log_dir: Path, fill: Path | None = None, flag: Path | None = None,
              hold: Path | None = None, fail: str | None = None):
    """A trial: a train report, its artifacts (config, eval, a grid), final metrics; a marker
    `start.<key>.<ns>` / `final.<key>.<ns>` in log_dir for each start and final report. The trial
    of replace_ratio 0.8, just before its final report: fills the disk of `fill` (writes it
    until ENOSPC), touches `flag`. While `hold` exists, the trial of replace_ratio 1.0 waits.
    The trial with key `fail` fails."""
    log_dir, fill, flag, hold = (p and str(p) for p in (log_dir, fill, flag, hold))

    def fake_trial(config):
        key, cfg = trial_key(config), resolved_config(config)
        ratio = cfg.train.stage2.replace_ratio
        Path(log_dir, f"start.{key}.{time.time_ns()}").write_text("")
        if key == fail:
            raise ValueError(f"injected failure of {key}")
        report_train("stage1", 1, {"loss": 1.0})
        if ratio == 1.0 and hold:
            deadline = time.time() + 300
            while Path(hold).exists() and time.time() < deadline:
                time.sleep(0.2)
        metrics = {"psnr_s1": 10 + ratio, "token_top1": ratio / 2}
        out = Path(tempfile.mkdtemp()) / "artifacts"
        rr.write_trial_artifacts(out, to_dict(cfg), config["trial"], metrics, {}, [],
                                 {1: np.full((64, 64, 3), 7, np.uint8)}, None)
        if ratio == 0.8 and fill:
            fd = os.open(fill, os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
            finally:
                os.close(fd)
        if ratio == 0.8 and flag:
            Path(flag).touch()
        Path(log_dir, f"final.{key}.{time.time_ns()}").write_text("")
        report_final(metrics, out)

    return fake_trial


def markers(log_dir: Path, kind: str) -> list[str]:
    return sorted(p.name.split(".", 1)[1].rsplit(".", 1)[0] for p in log_dir.glob(f"{kind}.*"))


KEYS = ["replace_ratio=0.5_s0", "replace_ratio=0.8_s0", "replace_ratio=1.0_s0"]


def finished_once(client, spec: str) -> None:
    """One parent run; one FINISHED child run per trial."""
    parents, children = campaign_runs(client, spec)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags[rr.KEY_TAG] for c in children) == KEYS
    assert all(c.info.status == "FINISHED" for c in children)


# --------------------------------------------------------------------------------------------
# A store that cannot be written: refused before anything
# --------------------------------------------------------------------------------------------


def test_an_unwritable_store_is_refused_before_anything(tmp_path, read_only_dir, capsys):
    store = read_only_dir / "store"
    res = run_campaign(plan_for(write_spec(tmp_path, "ro_store")), Options(
        tracking=str(store), work_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "c"),
        prepare_teacher=False, trial_fn=lambda config: pytest.fail("a trial ran")))
    err = capsys.readouterr().err.strip()
    assert res.exit_code == 1 and one_line(err)
    assert err.startswith(f"error: StorageNotWritableError: cannot write to {store} (the MLflow "
                          "store (--tracking-uri)): ")
    assert err.endswith("; make it writable or choose another directory")
    assert not (tmp_path / "runs" / "ro_store").exists()  # no campaign dir either


@pytest.fixture
def read_only_file():
    """Make a file read-only for this process: mode 0444 for a normal user; root ignores
    modes, so a read-only bind mount over it (skipped where that is refused)."""
    mounted = []

    def make(path: Path) -> None:
        if os.geteuid() != 0:
            path.chmod(0o444)
            return
        for cmd in (["mount", "--bind", str(path), str(path)],
                    ["mount", "-o", "remount,bind,ro", str(path)]):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                pytest.skip(f"cannot bind-mount a file read-only here ({done.stderr.strip()})")
            mounted.append(path)

    yield make
    for path in mounted[:1]:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


def test_a_read_only_store_database_is_refused_before_anything(tmp_path, read_only_file, capsys):
    store = tmp_path / "store"
    trk.open_store(str(store))  # an existing store, e.g. copied from a read-only snapshot
    read_only_file(store / rr.DB_FILE)
    res = run_campaign(plan_for(write_spec(tmp_path, "ro_db")), Options(
        tracking=str(store), work_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "c"),
        prepare_teacher=False, trial_fn=lambda config: pytest.fail("a trial ran")))
    err = capsys.readouterr().err.strip()
    assert res.exit_code == 1
    assert err == (f"error: StorageNotWritableError: cannot write to {store / rr.DB_FILE} (the "
                   "MLflow store (--tracking-uri)): the database file is read-only; make it "
                   "writable or choose another directory")


# --------------------------------------------------------------------------------------------
# A full store while the driver writes it, then --resume
# --------------------------------------------------------------------------------------------


def test_an_artifact_cut_short_by_a_full_store_then_resume(ray_session, tmp_path, monkeypatch,
                                                          capsys):
    """The driver copies the grids of replace_ratio 0.8 into the store and meets a full disk
    half-way: one line, the cut-short copy is not kept, the trial's run stays unfinished;
    `--resume` (space freed) runs it again and logs all of it once; the finished trial is not
    run again."""
    from mlflow.store.artifact import local_artifact_repo

    logs, flag, store = tmp_path / "logs", tmp_path / "store-full", tmp_path / "store"
    logs.mkdir()
    copytree = local_artifact_repo.shutil_copytree_without_file_permissions

    def full_half_way(src, dst):  # as a full disk: the first file half-written, then ENOSPC
        if not flag.exists():
            return copytree(src, dst)
        first = min(Path(src).rglob("*.png"))
        target = Path(dst) / first.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(first.read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(local_artifact_repo, "shutil_copytree_without_file_permissions",
                        full_half_way)
    plan = plan_for(write_spec(tmp_path, "full_artifacts"))
    opts = {"tracking": str(store), "work_dir": str(tmp_path / "runs"), "max_concurrent": 1,
            "prepare_teacher": False}
    res = run_campaign(plan, Options(trial_fn=make_fake(logs, flag=flag), **opts))
    out = capsys.readouterr()
    assert res.exit_code == 1 and "Traceback" not in out.out + out.err, out
    errors = [ln for ln in out.err.splitlines() if ln.startswith("error:")]
    client = trk.open_store(str(store))[0]
    _, children = campaign_runs(client, "full_artifacts")
    cut = next(c for c in children if c.data.tags[rr.KEY_TAG] == KEYS[1])
    run_dir = Path(cut.info.artifact_uri.removeprefix("file://"))
    assert errors == [(f"error: StorageFullError: no space left on the device of "
                       f"{run_dir / 'grids' / 'recon_s1.png'} {FULL_STORE}")], out
    assert "continue with: " in out.err
    assert cut.info.status != "FINISHED" and not run_dir.exists()  # nothing cut short kept
    assert markers(logs, "final") == KEYS[:2]

    flag.unlink()  # space freed
    res = run_campaign(plan, Options(resume=True, trial_fn=make_fake(logs), **opts))
    assert res.exit_code == 0
    assert markers(logs, "start") == [KEYS[0], KEYS[1], KEYS[1], KEYS[2]]  # 0.5 not again
    finished_once(client, "full_artifacts")
    cut = client.get_run(cut.info.run_id)
    arts = {a.path for a in client.list_artifacts(cut.info.run_id, "grids")}
    assert arts == {"grids/recon_s1.png"}
    png = Path(cut.info.artifact_uri.removeprefix("file://")) / "grids" / "recon_s1.png"
    assert png.stat().st_size > 100  # whole
    # Its eval metrics, logged before the copy failed, have one point each (not one per try).
    assert len(client.get_metric_history(cut.info.run_id, "eval/psnr_s1")) == 1


def test_a_full_store_for_real_then_resume(ray_session, tmp_path, capsys):
    """The store on a 3 MiB tmpfs that the trial of replace_ratio 0.8 fills before its final
    report: the driver's next write fails for real (SQLite: "database or disk is full"), the
    campaign stops with one line; space freed, `--resume` finishes each trial once."""
    logs = tmp_path / "logs"
    logs.mkdir()
    with mounted_tmpfs(tmp_path / "storefs", "3m") as fs:
        store, filler = fs / "store", fs / "filler"
        plan = plan_for(write_spec(tmp_path, "full_store"))
        opts = {"tracking": str(store), "work_dir": str(tmp_path / "runs"),
                "max_concurrent": 1, "prepare_teacher": False}
        res = run_campaign(plan, Options(trial_fn=make_fake(logs, fill=filler), **opts))
        out = capsys.readouterr()
        assert res.exit_code == 1 and "Traceback" not in out.out + out.err
        errors = {ln for ln in out.err.splitlines() if ln.startswith("error:")}
        assert errors == {(f"error: StorageFullError: no space left on the device of {store} "
                           f"{FULL_STORE}")}
        assert "continue with: " in out.err
        filler.unlink()  # space freed
        res = run_campaign(plan, Options(resume=True, trial_fn=make_fake(logs), **opts))
        assert res.exit_code == 0
        assert markers(logs, "final") == [KEYS[0], KEYS[1], KEYS[1], KEYS[2]]
        finished_once(trk.open_store(str(store))[0], "full_store")


# --------------------------------------------------------------------------------------------
# Two --resume of one campaign at once
# --------------------------------------------------------------------------------------------


def test_two_resumes_at_once_one_proceeds_the_other_says_who(ray_session, tmp_path, capsys):
    """A campaign stopped with one trial unfinished; `--resume` in a process of its own
    (waiting inside that trial), and a second `--resume` meanwhile: it changes nothing and
    says which process runs the campaign; the first finishes the trial, once."""
    logs, hold, store = tmp_path / "logs", tmp_path / "hold", tmp_path / "store"
    logs.mkdir()
    spec_path = write_spec(tmp_path, "two_resumes")
    plan = plan_for(spec_path)
    opts = {"tracking": str(store), "work_dir": str(tmp_path / "runs"), "prepare_teacher": False}
    res = run_campaign(plan, Options(trial_fn=make_fake(logs, fail=KEYS[2]), **opts))
    assert res.exit_code == 1
    capsys.readouterr()  # the first invocation's lines
    client = trk.open_store(str(store))[0]
    (parent,), _ = campaign_runs(client, "two_resumes")
    lock = Path(parent.data.tags[rr.CAMPAIGN_DIR_TAG]) / DRIVER_LOCK

    hold.touch()
    trial_fn = trial_fn_ref(tmp_path, __file__, "store_faults",
                            f"mod.make_fake(Path({str(logs)!r}), hold=Path({str(hold)!r}))")
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), str(spec_path), "--resume",
           "--tracking-uri", str(store), "--work-dir", str(tmp_path / "runs"), "--ray-address",
           ray.get_runtime_context().gcs_address, "--trial-fn", trial_fn,
           "--no-teacher", "--progress-every", "-1"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        deadline = time.time() + 240
        # the first is inside the trial (its second start: the first run's failed one is 1st)
        while markers(logs, "start").count(KEYS[2]) < 2:
            assert time.time() < deadline and first.poll() is None, first.stdout.read()
            time.sleep(0.5)
        res = run_campaign(plan, Options(resume=True, trial_fn=lambda config: pytest.fail(
            "the second --resume ran a trial"), **opts))
        err = capsys.readouterr().err.strip()
        assert res.exit_code == 2 and one_line(err)
        head = (f"error: campaign {plan.campaign_hash} (parent run {parent.info.run_id}) is "
                f"being run by pid {first.pid} on {socket.gethostname()} since ")
        assert err.startswith(head), err
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(", err[len(head):]), err
        assert trial_fn in err  # its command line
        assert err.endswith("; this invocation changed nothing — wait for that one to end (or "
                            "stop it), then --resume")
        assert client.get_run(parent.info.run_id).data.tags[rr.RESUMED_TAG] == "1"  # the 1st's
    finally:
        hold.unlink()
        output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output[-3000:]
    assert markers(logs, "final") == KEYS  # each trial finished once
    finished_once(client, "two_resumes")
    assert lock.read_text().startswith(f"pid {first.pid} on ")  # the last holder's line
