"""The experiment runner end to end: Ray Tune trials -> MLflow runs (issue 5).

One Ray session and one MLflow store per module (Ray start-up and SQLite schema creation cost
seconds). The orchestration tests inject fake trial functions that speak the runner's report
protocol (`sftok_experiments.protocol.report_*`); the smoke test runs the real pipeline
(teacher -> stage 1 -> stage 2 -> evaluate) of `ablation_replace_ratio --preset smoke --seeds 1`
and checks the run record it writes against the one recorded before issue 18
(`tests/fixtures/run_record.json`).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import record_fixture
from campaign_helpers import ROOT, campaign_runs, plan_for, ratio_arms, trial_fn_ref, write_spec
from sftok_experiments.campaign import Options, run_campaign

# Fake trial functions below are shipped to Ray workers by value (workers cannot import tests/).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------------------------
# Fake trial functions
# --------------------------------------------------------------------------------------------


def make_fake(log_dir: Path, fail_ratio: float | None = None, sleep_ratio: float | None = None,
              fail_first: bool = False):
    """A trial function: 3 train reports per stage, stage checkpoints, artifacts, eval metrics.
    `fail_first`: the first trial to start fails (with max_concurrent=1, exactly one)."""
    log_dir = str(log_dir)

    def fake_trial(config):
        import tempfile

        import numpy as np
        from sftok_experiments.protocol import (
            report_final,
            report_stage_done,
            report_train,
            resolved_config,
            trial_key,
        )

        from sftok.config import to_dict
        from sftok.run_record import write_trial_artifacts

        key = trial_key(config)
        cfg = resolved_config(config)
        ratio = cfg.train.stage2.replace_ratio
        Path(log_dir, f"{key}.{time.time_ns()}").write_text("ran")
        if fail_ratio is not None and ratio == fail_ratio:
            raise ValueError(f"injected failure at replace_ratio={ratio}")
        if fail_first:
            try:
                Path(log_dir, "failed-first").touch(exist_ok=False)
            except FileExistsError:
                pass
            else:
                raise ValueError("injected failure of the first trial")
        if sleep_ratio is not None and ratio == sleep_ratio:
            time.sleep(300)
        step = 0
        for stage in config["trial"]["stages"]:
            for _ in range(3):
                step += 1
                report_train(stage, step, {"loss": 1.0 / step, "ce": 2.0 / step})
            report_stage_done(stage, step)
        metrics = {"psnr_s1": 10 + ratio, "psnr_s4": 12 + ratio, "token_top1": ratio / 2}
        out = Path(tempfile.mkdtemp()) / "artifacts"
        write_trial_artifacts(out, to_dict(cfg), config["trial"], metrics, {"rfid": "no weights"},
                        [{"step": 1, "kl_gt_all": 1.0, "top1_gt_all": 0.2},
                         {"step": 2, "kl_gt_all": 0.5, "top1_gt_all": 0.4}],
                        {1: np.zeros((8, 8, 3), np.uint8)}, None)
        report_final(metrics, out)

    return fake_trial


def ran(log_dir: Path) -> list[str]:
    return sorted(p.name.rsplit(".", 1)[0] for p in log_dir.iterdir())


# --------------------------------------------------------------------------------------------
# Orchestration with fake trials
# --------------------------------------------------------------------------------------------


def test_campaign_logs_parent_children_metrics_artifacts(ray_session, store, client, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    plan = plan_for(write_spec(tmp_path, "fake_ok"))
    res = run_campaign(plan, Options(tracking=str(store), work_dir=str(tmp_path / "runs"),
                                     trial_fn=make_fake(logs), prepare_teacher=False))
    assert res.exit_code == 0, res
    parents, children = campaign_runs(client, "fake_ok")
    assert len(parents) == 1 and len(children) == 3
    p = parents[0]
    assert p.info.status == "FINISHED"
    for tag in ("spec", "preset", "git_commit", "command", "sftok.campaign"):
        assert p.data.tags.get(tag), tag
    assert p.data.tags["preset"] == "smoke"
    arms = sorted(c.data.tags["arm"] for c in children)
    assert arms == ["replace_ratio=0.5", "replace_ratio=0.8", "replace_ratio=1.0"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["mlflow.parentRunId"] == p.info.run_id
        assert c.data.tags["seed"] == "0" and c.data.tags["sftok.role"] == "trial"
        ratio = float(c.data.tags["arm"].split("=")[1])
        assert float(c.data.params["train.stage2.replace_ratio"]) == ratio
        assert c.data.params["preset"] == "smoke" and "tokenizer.encoder.width" in c.data.params
        assert c.data.metrics["eval/psnr_s4"] == pytest.approx(12 + ratio)
        hist = client.get_metric_history(c.info.run_id, "train/stage2/loss")
        assert [m.step for m in hist] == [4, 5, 6]  # global optimiser step
        trace = client.get_metric_history(c.info.run_id, "trace/kl_gt_all")
        assert sorted((m.step, m.value) for m in trace) == [(1, 1.0), (2, 0.5)]
        arts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"config.json", "eval.json", "trace.csv", "grids"} <= arts
        assert [a.path for a in client.list_artifacts(c.info.run_id, "grids")] == \
            ["grids/recon_s1.png"]
        assert c.data.tags["eval_unavailable.rfid"] == "no weights"
    assert ran(logs) == sorted(t.key for t in plan.trials)


def test_failed_trial_is_recorded_and_resume_reruns_only_it(ray_session, store, client,
                                                             tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    plan = plan_for(write_spec(tmp_path, "fake_fail"))
    opts = dict(tracking=str(store), work_dir=str(tmp_path / "runs"), prepare_teacher=False)
    res = run_campaign(plan, Options(trial_fn=make_fake(logs, fail_ratio=0.8), **opts))
    assert res.exit_code != 0
    out = capsys.readouterr()
    assert "FAILED" in out.out and "injected failure" in out.err
    parents, children = campaign_runs(client, "fake_fail")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    status = {c.data.tags["arm"]: c.info.status for c in children}
    assert status == {"replace_ratio=0.5": "FINISHED", "replace_ratio=0.8": "FAILED",
                      "replace_ratio=1.0": "FINISHED"}
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "injected failure" in failed.data.tags["error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}

    # Resume: only the failed trial runs again, into its existing child run.
    for f in logs.iterdir():
        f.unlink()
    res = run_campaign(plan, Options(trial_fn=make_fake(logs), resume=True, **opts))
    assert res.exit_code == 0
    assert ran(logs) == ["replace_ratio=0.8_s0"]
    parents, children = campaign_runs(client, "fake_fail")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    assert failed.info.run_id in {c.info.run_id for c in children}
    assert "error" not in next(c for c in children
                               if c.info.run_id == failed.info.run_id).data.tags
    # Without --resume a new invocation is a new parent run.
    res = run_campaign(plan, Options(trial_fn=make_fake(logs), **opts))
    assert res.exit_code == 0
    parents, children = campaign_runs(client, "fake_fail")
    assert len(parents) == 2 and len(children) == 6


def make_crashing(log_dir: Path, work_root: Path):
    """Crashes once after stage 1 (its Ray checkpoint holds stage1/final); the retry must
    restore stage 1 from that checkpoint into a fresh work dir and train only stage 2."""
    log_dir, work_root = str(log_dir), str(work_root)

    def crashing_trial(config):
        import shutil
        import tempfile

        from sftok_experiments.protocol import (
            last_checkpoint,
            report_final,
            report_stage_done,
            report_train,
            trial_key,
        )
        from sftok_experiments.stage_store import StageOutcome, StageStore, snapshot

        key = trial_key(config)
        work = Path(work_root) / key
        attempt = len(list(Path(log_dir).glob(f"{key}.attempt*")))
        Path(log_dir, f"{key}.attempt{attempt}").write_text("")
        shutil.rmtree(work, ignore_errors=True)  # as if the retry ran on another node
        work.mkdir(parents=True)
        store = StageStore(work / "stages")
        with last_checkpoint() as last:
            if last is not None:
                store.restore(last)
        step, done = 0, []
        for stage in config["trial"]["stages"]:
            skey = f"{stage}-fake"
            if store.published(skey) is not None:
                step += 3
                done.append(StageOutcome(stage, skey, store.path(skey), 3, "reused"))
                continue
            Path(log_dir, f"{key}.trained-{stage}").write_text("")
            for _ in range(3):
                step += 1
                report_train(stage, step, {"loss": 1.0 / step})
            result = work / f"building-{skey}"
            result.mkdir()
            (result / "model.safetensors").write_text("weights")
            (result / "stage.json").write_text('{"steps": 3, "metrics": {}, "history": []}')
            result = store.publish(skey, result)
            done.append(StageOutcome(stage, skey, result, 3, "trained"))
            report_stage_done(stage, step, snapshot(done, Path(tempfile.mkdtemp())),
                              source="trained", key=skey, steps=3)
            if attempt == 0:
                raise RuntimeError("simulated crash after stage 1")
        out = Path(tempfile.mkdtemp()) / "artifacts"
        out.mkdir()
        (out / "eval.json").write_text("{}")
        report_final({"psnr_s1": 1.0}, out)

    return crashing_trial


def test_crashed_trial_retries_from_its_checkpoint(ray_session, store, client, tmp_path,
                                                   capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    path = write_spec(tmp_path, "fake_retry", max_failures=1, arms=ratio_arms([1.0]))
    res = run_campaign(plan_for(path), Options(
        tracking=str(store), work_dir=str(tmp_path / "runs"), prepare_teacher=False,
        trial_fn=make_crashing(logs, tmp_path / "work")))
    assert res.exit_code == 0
    assert "retrying from its last checkpoint" in capsys.readouterr().out
    names = sorted(p.name for p in logs.iterdir())
    key = "replace_ratio=1.0_s0"
    assert names == sorted([f"{key}.attempt0", f"{key}.attempt1", f"{key}.trained-stage1",
                            f"{key}.trained-stage2"])  # stage 1 trained once
    _, children = campaign_runs(client, "fake_retry")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    hist = client.get_metric_history(children[0].info.run_id, "train/stage1/loss")
    assert [m.step for m in hist] == [1, 2, 3]  # no duplicated points


def test_optuna_search(ray_session, store, client, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    path = write_spec(tmp_path, "fake_search", arms={}, search={
        "space": {"train.stage2.replace_ratio": {"uniform": [0.5, 1.0]},
                  "train.stage2.optim.lr": {"loguniform": [1e-4, 1e-2]}},
        "metric": "eval/psnr_s4", "mode": "max", "num_samples": 3})
    res = run_campaign(plan_for(path), Options(tracking=str(store), work_dir=str(tmp_path),
                                               trial_fn=make_fake(logs), max_concurrent=2,
                                               prepare_teacher=False))
    assert res.exit_code == 0
    parents, children = campaign_runs(client, "fake_search")
    assert len(parents) == 1 and len(children) == 3
    for c in children:
        assert c.info.status == "FINISHED"
        ratio = float(c.data.params["train.stage2.replace_ratio"])
        assert 0.5 <= ratio <= 1.0
        assert float(c.data.tags["search.train.stage2.replace_ratio"]) == pytest.approx(ratio)
        assert c.data.metrics["eval/psnr_s4"] == pytest.approx(12 + ratio)


def test_optuna_search_resume(ray_session, store, client, tmp_path):
    """Resuming a search hands the finished samples to Optuna under Ray's `search/<field>`
    names (bare names crashed with "Inconsistent parameters") and runs only the rest."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = write_spec(tmp_path, "fake_search_resume", arms={}, search={
        "space": {"train.stage2.replace_ratio": {"uniform": [0.5, 1.0]},
                  "train.stage2.optim.lr": {"loguniform": [1e-4, 1e-2]}},
        "metric": "eval/psnr_s4", "mode": "max", "num_samples": 3})
    opts = dict(tracking=str(store), work_dir=str(tmp_path), max_concurrent=1,
                prepare_teacher=False)
    res = run_campaign(plan_for(path), Options(trial_fn=make_fake(logs, fail_first=True),
                                               **opts))
    assert res.exit_code != 0
    _, children = campaign_runs(client, "fake_search_resume")
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED", "FINISHED"]
    res = run_campaign(plan_for(path), Options(trial_fn=make_fake(logs), resume=True, **opts))
    assert res.exit_code == 0, res
    parents, children = campaign_runs(client, "fake_search_resume")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sum(c.info.status == "FINISHED" for c in children) == 3


def test_resume_without_a_campaign_exits_2(store, client, tmp_path, capsys):
    """--resume that matches no campaign (e.g. a different --set) stops, listing the spec's
    recent runs, instead of silently starting everything afresh."""
    from sftok_experiments.cli import main
    from sftok_experiments.tracking import get_experiment, open_store

    path = write_spec(tmp_path, "fake_noresume")
    exp_id = get_experiment(client, "fake_noresume", open_store(str(store))[1].artifact_root)
    old = client.create_run(exp_id, tags={"sftok.role": "parent", "sftok.campaign": "other",
                                          "command": "run.py fake_noresume --set x=1"})
    rc = main([str(path), "--resume", "--tracking-uri", str(store), "--no-teacher",
               "--work-dir", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no earlier invocation of this campaign" in err
    assert old.info.run_id in err and "run.py fake_noresume --set x=1" in err
    parents, children = campaign_runs(client, "fake_noresume")
    assert [p.info.run_id for p in parents] == [old.info.run_id] and not children


def test_worker_env_forwarded(monkeypatch):
    from sftok_experiments import campaign

    for k in campaign.FORWARDED_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SFTOK_LPIPS_WEIGHTS", "/w/lpips.pth")
    monkeypatch.setenv("HF_HOME", "/hf")
    assert campaign._forwarded_env() == {"SFTOK_LPIPS_WEIGHTS": "/w/lpips.pth", "HF_HOME": "/hf"}


def test_search_warm_start_uses_ray_names():
    from sftok_experiments.campaign import warm_start

    class R:  # the bits of an MLflow run warm_start reads
        def __init__(self, tags, params, metrics):
            self.data = type("D", (), {"tags": tags, "params": params, "metrics": metrics})

    search = {"space": {"a.b": {"uniform": [0, 1]}, "c": {"choice": ["x", "y"]}},
              "metric": "eval/psnr_s8"}
    done = {"k1": R({"search.a.b": "0.25", "search.c": "y"}, {"a.b": "0.25", "c": "y"},
                    {"eval/psnr_s8": 3.0}),
            "k2": R({"search.a.b": "0.5", "search.c": "x"}, {}, {})}  # no metric: left out
    points, rewards = warm_start(search, done)
    assert points == [{"search/a.b": 0.25, "search/c": "y"}] and rewards == [3.0]


def test_interrupted_campaign_resumes_without_duplicates(ray_session, store, client, tmp_path):
    """Kill the driver (SIGKILL) mid-campaign, then --resume: nothing finished re-runs and no
    child run is duplicated. The first invocation is a real `experiments/run.py` process that
    attaches to this module's Ray cluster with --ray-address."""
    logs = tmp_path / "logs"
    logs.mkdir()
    spec_path = write_spec(tmp_path, "fake_interrupt")
    trial_fn = trial_fn_ref(tmp_path, __file__, "runner_tests",
                            f"mod.make_fake(Path({str(logs)!r}), sleep_ratio=1.0)")
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), str(spec_path),
           "--tracking-uri", str(store), "--work-dir", str(tmp_path / "runs"),
           "--ray-address", address, "--trial-fn", trial_fn, "--no-teacher",
           "--max-concurrent", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if client.get_experiment_by_name("fake_interrupt") is not None:
                _, kids = campaign_runs(client, "fake_interrupt")
                if sum(r.info.status == "FINISHED" for r in kids) == 2 and len(kids) == 3:
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("campaign did not reach 2 finished trials in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group
        proc.wait()
    parents, children = campaign_runs(client, "fake_interrupt")
    assert len(parents) == 1 and parents[0].info.status == "RUNNING"
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED", "RUNNING"]

    for f in logs.iterdir():
        f.unlink()
    res = run_campaign(plan_for(spec_path), Options(
        tracking=str(store), work_dir=str(tmp_path / "runs"), trial_fn=make_fake(logs),
        resume=True, prepare_teacher=False))
    assert res.exit_code == 0
    assert ran(logs) == ["replace_ratio=1.0_s0"]
    parents, children = campaign_runs(client, "fake_interrupt")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    keys = [c.data.tags["trial_key"] for c in children]
    assert sorted(keys) == ["replace_ratio=0.5_s0", "replace_ratio=0.8_s0",
                            "replace_ratio=1.0_s0"]
    assert all(c.info.status == "FINISHED" for c in children)


# --------------------------------------------------------------------------------------------
# The real thing: ablation_replace_ratio --preset smoke --seeds 1
# --------------------------------------------------------------------------------------------


def test_smoke_end_to_end(ray_session, store, client, tmp_path, capsys):
    from sftok_experiments.cli import main

    rc = main(["ablation_replace_ratio", "--preset", "smoke", "--seeds", "1",
               "--tracking-uri", str(store), "--work-dir", str(tmp_path / "runs"),
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    console = capsys.readouterr().out
    # The run record is the one the runner wrote before issue 18 (tags, metric keys and
    # steps, params, artifacts), and the notebooks' reader makes of it what they expect.
    assert record_fixture.differences(client, "ablation_replace_ratio") == []
    check_notebook_reader(str(store))
    parents, children = campaign_runs(client, "ablation_replace_ratio")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["spec"] == "ablation_replace_ratio"
    assert sorted(c.data.tags["arm"] for c in children) == [
        "replace_ratio=0.5", "replace_ratio=0.8", "replace_ratio=1.0"]
    for c in children:
        assert c.info.status == "FINISHED"
        evals = {k for k in c.data.metrics if k.startswith("eval/")}
        assert {"eval/psnr_s8", "eval/ssim_s8", "eval/psnr_s1", "eval/token_top1"} <= evals
        assert any(k.startswith("train/stage1/") for k in c.data.metrics)
        assert any(k.startswith("train/stage2/") for k in c.data.metrics)
        assert any(k.startswith("trace/") for k in c.data.metrics)
        arts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"config.json", "eval.json", "trace.csv", "grids", "checkpoint"} <= arts
        ck = {a.path for a in client.list_artifacts(c.info.run_id, "checkpoint")}
        assert "checkpoint/model.safetensors" in ck
    # Stage 0 ran once, in the driver, and is logged on the parent run.
    assert any(k.startswith("train/stage0/") for k in parents[0].data.metrics)
    # The arms share stage 1 (issue 10): trained once, reused twice; stage 2 is per arm.
    m = parents[0].data.metrics
    assert (m["campaign/stages_trained"], m["campaign/stages_reused"]) == (4, 2)
    s1 = {c.data.tags["stage.stage1.key"] for c in children}
    assert len(s1) == 1 and sorted(c.data.tags["stage.stage1.source"] for c in children) == [
        "reused", "reused", "trained"]
    assert all(c.data.tags["stage.stage2.source"] == "trained" for c in children)
    # A reused stage prints its reuse line only, never a progress line of its replayed curve;
    # the trial that trained it shows its progress (issue 20, item 5).
    for c in children:
        key, source = c.data.tags["trial_key"], c.data.tags["stage.stage1.source"]
        progress = re.findall(rf"trial {re.escape(key)} +stage1 \d+/3 ", console)
        assert bool(progress) == (source == "trained"), (key, source, console)
        assert re.search(rf"trial {re.escape(key)} +stage1 done \(global step 3, {source} ",
                         console), console
    # Every child shows the stage-1 curve, the reused ones replayed from the shared result.
    curves = {c.info.run_id: [(p.step, p.value) for p in
                              client.get_metric_history(c.info.run_id, "train/stage1/loss")]
              for c in children}
    assert len({tuple(v) for v in curves.values()}) == 1 and next(iter(curves.values()))

    # The same campaign with every trial training every stage itself gives bitwise the same
    # numbers, and a third invocation in the shared work dir reuses everything.
    rc = main(["ablation_replace_ratio", "--preset", "smoke", "--seeds", "1",
               "--tracking-uri", str(store), "--work-dir", str(tmp_path / "unshared"),
               "--cache-dir", str(tmp_path / "cache"), "--no-share-stages"])
    assert rc == 0
    parents, children2 = campaign_runs(client, "ablation_replace_ratio")
    latest = max(parents, key=lambda p: p.info.start_time)
    assert (latest.data.metrics["campaign/stages_trained"],
            latest.data.metrics["campaign/stages_reused"]) == (6, 0)
    evals = lambda runs: {c.data.tags["arm"]: {k: v for k, v in c.data.metrics.items()
                                              if k.startswith("eval/")} for c in runs}
    first = evals(children)
    second = evals([c for c in children2 if c.data.tags["mlflow.parentRunId"]
                    == latest.info.run_id])
    assert first == second and first


def check_notebook_reader(store: str) -> None:
    """analysis/mlflow_data on a smoke ablation_replace_ratio campaign (1 seed, S = 1 and 8)."""
    import mlflow_data as md

    camp = md.load_campaign("ablation_replace_ratio", store)
    assert sorted(camp.runs["arm"]) == ["replace_ratio=0.5", "replace_ratio=0.8",
                                        "replace_ratio=1.0"] and camp.seeds == [0]
    assert sorted(camp.column("train.stage2.replace_ratio")) == [0.5, 0.8, 1.0]
    assert camp.preset == "smoke" and set(camp.trained_stages()) == {("stage1", "stage2")}
    assert md.eval_steps(camp) == [1, 8] and md.choose_steps(camp) == 8
    assert md.choose_metric(camp, 8) == ("psnr", "eval/psnr_s8")  # smoke: no LPIPS / rFID
    assert set(md.bound_values(camp, "psnr")) == set(md.BOUNDS)
    assert "a naive codec with the tokenizer's bits scores" in md.bounds_reading(
        camp, "psnr", dict(zip(camp.runs["arm"], camp.column("eval/psnr_s8"))))
    hist = camp.history("train/stage2/loss")
    assert sorted(set(hist["step"])) == [4, 5, 6] and hist["run_id"].nunique() == 3
    traces = camp.traces()
    assert sorted(set(traces["step"])) == [1, 2, 3, 4] and len(traces) == 3 * 4
    assert camp.unavailable() == {} and camp.why_missing("rfid").startswith("not among")


def test_a_shipped_teacher_campaign_trains_no_teacher(ray_session, store, client, tmp_path):
    """The real pipeline with the teacher shipped for `tiny` (issue 20): the driver loads it
    (no stage 0, no teacher cache), the trials and the stage keys name it by content hash,
    and every evaluation that traces also measures the revealed-token information."""
    from sftok_experiments.cli import main

    from sftok.released import read_manifest

    sha = read_manifest("tiny")["sha256"]
    spec = write_spec(tmp_path, "shipped_teacher",
                      arms={"grid": {"train.stage2.replace_ratio": [1.0]}})
    tiny_teacher = ["teacher.source=shipped", "teacher.shipped=tiny", "teacher.sha256=" + sha,
                    "teacher.channel_mult=[1, 2, 2]", "teacher.z_channels=32",
                    "teacher.codebook_size=256", "tokenizer.image_size=32", "data.image_size=32"]
    rc = main([str(spec), "--tracking-uri", str(store), "--work-dir", str(tmp_path / "runs"),
               "--cache-dir", str(tmp_path / "cache"),
               *[a for s in tiny_teacher for a in ("--set", s)]])
    assert rc == 0
    parents, children = campaign_runs(client, "shipped_teacher")
    assert parents[0].data.tags["teacher.0"] == f"shipped-{sha[:16]}"
    assert not any(k.startswith("train/stage0/") for k in parents[0].data.metrics)
    assert not (tmp_path / "cache" / "teachers").exists() or not any(
        p.name.startswith("teacher-") for p in (tmp_path / "cache" / "teachers").iterdir())
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "teacher")}
    assert logged == {f"teacher/shipped-{sha[:16]}.json"}
    (c,) = children
    assert c.info.status == "FINISHED"
    assert {"eval/reveal_info_gt_r50", "eval/reveal_info_self_r25",
            "eval/reveal_ce_none_r75"} <= set(c.data.metrics)
