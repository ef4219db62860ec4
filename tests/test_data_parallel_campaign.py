"""Data-parallel trials in a campaign (issue 19): `--workers-per-trial 2` on CPU with gloo.

The real runner and trial (`run_campaign`, `trial.run_trial` -> `data_parallel.TrialWorkers`:
one Ray Train run of 2 workers per stage and for the evaluation) on a local Ray of 4 logical
CPUs, smoke preset. Checked: a W = 2 trial equals the W = 1 trial (stage weights, loss curve,
evaluation) and records `placement.workers` and every rank's placement; requests that cannot run
are refused before compute with one line; a NaN on one rank and a dead worker end the trial with
one line naming the rank (or, configured to retry, the trial continues from its checkpoint); two
2-worker trials train at once on 4 CPUs; a killed campaign driver resumes the stage from its
last checkpoint to the uninterrupted run's weights; the generation stage on 2 workers.

Faults are injected into the Ray Train workers by the Ray session's worker setup hook
(`init_ray(worker_setup=)`): it wraps the token stages' loss (`sftok.train.stages.weighted_ce`)
and, when the control file `fault.json` says so, poisons it or kills the process on one rank at
one call, or records (process group, rank, time) of each call.
"""
from __future__ import annotations

import contextlib
import json
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
from campaign_helpers import ROOT, campaign_runs, echo_lines, plan_for, write_spec
from safetensors.torch import load_file
from sftok_experiments.campaign import Options, init_ray, run_campaign
from sftok_experiments.placement import (
    TRIAL_PROCESS_MEMORY,
    concurrent_trials,
    rank_tags,
    resource_shortfall,
    trial_resources,
    worker_request_error,
)

from sftok import run_record as rr

# The setup hook below is shipped to Ray workers by value (workers cannot import tests/).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

W = 2
CPUS = 4  # two 2-worker trials at once


def make_worker_setup(control: str):
    """Every Ray worker process: the runner's own setup, then the loss wrapper (module doc)."""

    def setup() -> None:
        import math
        import os
        import time
        from pathlib import Path

        import torch.distributed as dist
        from sftok_experiments.protocol import quiet_ray_worker

        import sftok.train.stages as stages

        quiet_ray_worker()
        real, calls = stages.weighted_ce, [0]

        def loss(*args, **kwargs):
            out = real(*args, **kwargs)
            spec = Path(control, "fault.json")
            if not (spec.exists() and dist.is_initialized()):
                return out
            fault, rank = json.loads(spec.read_text()), dist.get_rank()
            calls[0] += 1
            if fault["kind"] == "trace":  # record; at the first call wait for the other group
                with open(Path(control, "trace.txt"), "a") as f:
                    f.write(f"{os.environ.get('MASTER_PORT')} {rank} {time.time()}\n")
                deadline = time.time() + fault.get("wait_s", 0)
                while calls[0] == 1 and time.time() < deadline and len({
                        ln.split()[0] for ln in Path(control, "trace.txt").read_text()
                        .splitlines()}) < fault["groups"]:
                    time.sleep(0.2)
            elif rank == fault["rank"] and calls[0] == fault["call"] and not Path(
                    control, "fired").exists():
                Path(control, "fired").write_text(f"{os.getpid()} {time.time()}")
                if fault["kind"] == "nan":
                    out.loss = out.loss * math.nan
                else:
                    os.kill(os.getpid(), 9)
            return out

        stages.weighted_ce = loss

    return setup


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def dp_ray(control):
    """A local Ray of 4 logical CPUs whose workers carry the fault hook (module docstring)."""
    if ray.is_initialized():
        ray.shutdown()  # another module's session, without the hook
    started = init_ray(num_cpus=CPUS, worker_setup=make_worker_setup(str(control)))
    yield
    if started:
        ray.shutdown()


def arm(control: Path, **fault) -> None:
    for name in ("fault.json", "fired", "trace.txt"):
        (control / name).unlink(missing_ok=True)
    if fault:
        (control / "fault.json").write_text(json.dumps(fault))


def spec(tmp_path: Path, name: str, **fields) -> Path:
    """One smoke trial of stage 1 (accumulating 2 micro-batches: one per worker) + evaluation."""
    return write_spec(tmp_path, name, **{"stages": ["stage1"], "arms": {}, **fields})


def opts(store: Path, tmp_path: Path, work: str, cache: Path | None = None, **kw) -> Options:
    """Options of a test campaign; the teacher cache is shared by the module's tests."""
    lines, echo = echo_lines()
    o = Options(tracking=str(store), work_dir=str(tmp_path / work),
                cache_dir=str(cache or tmp_path.parent / "dp-cache"), echo=echo,
                progress_every=-1, **kw)
    o.lines = lines  # the console, for the assertions
    return o


def children_of(client, name: str, result) -> list:
    return campaign_runs(client, name, result.parent_run_id)[1]


def stage_weights(work: Path, stage: str = "stage1") -> dict:
    (result,) = [p for p in (work / "stages").iterdir() if p.name.startswith(stage + "-")]
    return load_file(str(result / "model.safetensors"))


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-20))
               for k in a if a[k].is_floating_point())


# Float reduction order only (tests/test_data_parallel.py measured <= 6e-5 on final weights);
# on smoke stage 1 the Ray path gives bitwise the one-process weights (2 micro-batches: the
# mean of 2 all-reduced gradients is exact in binary floating point).
WEIGHT_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------
# Before compute
# --------------------------------------------------------------------------------------------


def test_impossible_requests_stop_before_compute_with_one_line(dp_ray, store, tmp_path):
    path = spec(tmp_path, "dp_refused")
    cases = [  # (options, the start of the one line)
        (dict(workers_per_trial=3), "--workers-per-trial: 3 workers cannot train trial base_s0: "
                                    "train.stage1.grad_accum: "),
        (dict(workers_per_trial=2, gpus_per_trial=0.5), "--gpus-per-trial 0.5 with "
                                                        "--workers-per-trial 2: "),
        (dict(workers_per_trial=2, cpus_per_trial=3), "--workers-per-trial 2 x "
                                                      "--cpus-per-trial 3 = 6 CPU(s) per trial "
                                                      "but Ray found 4 CPU(s)"),
        (dict(workers_per_trial=2, gpus_per_trial=1), "--workers-per-trial 2 x "
                                                      "--gpus-per-trial 1 = 2 GPU(s) per trial "
                                                      "but Ray found 0 GPU(s)"),
    ]
    cache = tmp_path / "cache"
    for i, (kw, start) in enumerate(cases):
        res = run_campaign(plan_for(path), opts(store, tmp_path, f"runs{i}", cache, **kw))
        error = res.usage_error or res.setup_error
        assert res.exit_code in (1, 2) and error.startswith(start), (kw, error)
        assert "\n" not in error
        assert all(t.status == "NOT RUN" for t in res.trials)
        assert not (cache / "teachers").exists()  # stage 0 did not start
    # W must divide every stage's accumulation: the line says how to keep the effective batch.
    res = run_campaign(plan_for(path, sets={"train.stage1.grad_accum": "1",
                                            "train.stage1.batch_size": "4"}),
                       opts(store, tmp_path, "runs9", cache, workers_per_trial=2))
    assert res.exit_code == 2 and res.usage_error.endswith(
        "(same effective batches in smaller micro-batches: --set train.stage1.batch_size=2 "
        "--set train.stage1.grad_accum=2)")


def test_trial_resources_and_how_many_trials_fit():
    """Pure arithmetic of placement.py: a Ray Train trial process reserves no CPU / GPU (its
    workers do), so two 2-worker trials of 1 CPU fit 4 CPUs, and one of 2 GPUs per worker none
    of 3 GPUs."""
    assert trial_resources(False, 2.0, 0.5) == {"cpu": 2.0, "gpu": 0.5}
    assert trial_resources(True, 2.0, 1.0) == {"cpu": 0, "gpu": 0, "memory": TRIAL_PROCESS_MEMORY}
    assert concurrent_trials(2, 1.0, 0.0, 4.0, 0.0) == 2
    assert concurrent_trials(8, 8.0, 1.0, 64.0, 8.0) == 1
    assert concurrent_trials(2, 1.0, 1.0, 16.0, 3.0) == 1  # 3 GPUs: one trial of 2 at a time
    assert resource_shortfall(2, 1.0, 2.0, 16.0, 3.0).startswith(
        "--workers-per-trial 2 x --gpus-per-trial 2 = 4 GPU(s) per trial but Ray found 3")
    assert resource_shortfall(2, 2.0, 1.0, 4.0, 2.0) is None
    assert worker_request_error(1, 0.5) is None and worker_request_error(2, 1.0) is None
    assert "must be a whole number" in worker_request_error(2, 0.5)


def test_rank_tags_name_every_rank_and_rank_0_plainly():
    per_rank = [{"placement.node": "a", "placement.device": "cuda:0", "placement.start": "1"},
                {"placement.node": "b", "placement.device": "cuda:0", "placement.start": "2"}]
    tags = rank_tags(per_rank)
    assert tags == {rr.WORKERS_TAG: "2", "placement.node": "a", "placement.device": "cuda:0",
                    "placement.rank0.node": "a", "placement.rank0.device": "cuda:0",
                    "placement.rank1.node": "b", "placement.rank1.device": "cuda:0"}


# --------------------------------------------------------------------------------------------
# One 2-worker trial equals one 1-worker trial, and records where every rank ran
# --------------------------------------------------------------------------------------------


def test_two_worker_trial_equals_one_worker_and_records_each_rank(dp_ray, store, client,
                                                                  tmp_path, control):
    arm(control)
    path = spec(tmp_path, "dp_equal")
    one = run_campaign(plan_for(path), opts(store, tmp_path, "w1"))
    two_opts = opts(store, tmp_path, "w2", workers_per_trial=W)
    two = run_campaign(plan_for(path), two_opts)
    assert one.ok and two.ok, two_opts.lines
    assert max_rel_diff(stage_weights(tmp_path / "w1"),
                        stage_weights(tmp_path / "w2")) <= WEIGHT_TOLERANCE
    (c1,) = children_of(client, "dp_equal", one)
    (c2,) = children_of(client, "dp_equal", two)
    for k in ("train/stage1/loss", "train/stage1/ce"):
        h1 = [(m.step, m.value) for m in client.get_metric_history(c1.info.run_id, k)]
        h2 = [(m.step, m.value) for m in client.get_metric_history(c2.info.run_id, k)]
        assert [s for s, _ in h1] == [s for s, _ in h2] == [1, 2, 3]
        assert max(abs(a - b) / abs(a) for (_, a), (_, b) in zip(h1, h2)) <= 1e-5
    e1 = {k: v for k, v in c1.data.metrics.items() if k.startswith("eval/")}
    e2 = {k: v for k, v in c2.data.metrics.items() if k.startswith("eval/")}
    assert e1.keys() == e2.keys() and e1["eval/num_images"] == e2["eval/num_images"] > 0
    assert all(abs(e1[k] - e2[k]) <= 1e-4 * max(1.0, abs(e1[k])) for k in e1), (e1, e2)
    # Where it ran: W, every rank's node and device (rank 0's also under the plain names).
    t1, t2 = c1.data.tags, c2.data.tags
    assert t1[rr.WORKERS_TAG] == "1" and not any(".rank" in k for k in t1)
    assert t2[rr.WORKERS_TAG] == "2"
    for rank in range(W):
        assert t2[rr.placement_tag("device", rank)] == "cpu"
        assert t2[rr.placement_tag("node", rank)] == t1[rr.placement_tag("node")]
    assert t2[rr.placement_tag("device")] == "cpu" and rr.placement_tag("start") in t2
    assert rr.placement_tag("end") in t2
    # The same artifacts as a one-worker trial (rank 0 wrote them, the driver logged them).
    arts = lambda run: sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert arts(c1) == arts(c2)
    assert any("2 workers of 1 CPU / 0 GPU each (Ray Train), max concurrent 2" in ln
               for ln in two_opts.lines)


# --------------------------------------------------------------------------------------------
# Failures inside the workers
# --------------------------------------------------------------------------------------------


def test_nan_on_one_rank_fails_the_trial_with_one_line(dp_ray, store, client, tmp_path,
                                                       control):
    arm(control, kind="nan", rank=1, call=2)  # rank 1's loss at step 2
    o = opts(store, tmp_path, "nan", workers_per_trial=W, max_failures=1)
    res = run_campaign(plan_for(spec(tmp_path, "dp_nan")), o)
    (trial,) = res.trials
    assert trial.status == "FAILED" and "\n" not in trial.error
    assert trial.error.startswith("NonFiniteLossError: stage1: non-finite loss (nan) at step 2")
    assert "on rank 1 of 2" in trial.error, trial.error
    (child,) = children_of(client, "dp_nan", res)
    assert child.data.tags[rr.ERROR_TAG] == trial.error
    # A NaN is deterministic: not retried although the campaign allows a retry.
    assert not any("retrying" in ln for ln in o.lines)
    print("NaN on one rank, as printed:", next(ln for ln in o.lines if "FAILED" in ln))


@pytest.mark.slow
@pytest.mark.parametrize("retries", [0, 1])
def test_a_dead_worker_ends_the_trial_with_one_line_or_is_retried(dp_ray, store, client,
                                                                  tmp_path, control, retries):
    """Rank 1 is SIGKILLed at step 2: one line naming rank 1, its process and the cause, within
    seconds of the kill; with a retry the trial continues from its checkpoint and finishes."""
    arm(control, kind="kill", rank=1, call=2)
    name = f"dp_kill{retries}"
    o = opts(store, tmp_path, "kill", workers_per_trial=W, max_failures=retries)
    path = spec(tmp_path, name, overrides={"train.stage1.steps": 4,
                                           "train.stage1.ckpt_every": 1})
    res = run_campaign(plan_for(path), o)
    pid, killed_at = (control / "fired").read_text().split()
    (child,) = children_of(client, name, res)
    lines = [ln for ln in o.lines if "WorkerDiedError" in ln]
    assert lines, o.lines
    if retries == 0:
        (trial,) = res.trials
        assert trial.status == "FAILED" and f"FAILED: {trial.error} (traceback" in lines[0]
        error = trial.error
    else:
        error = lines[0].split("(retry 1): ", 1)[1]
    assert error.startswith(f"WorkerDiedError: worker rank 1 of 2 (pid {pid} on node ")
    assert "died while training stage1: " in error and "\n" not in error
    if retries == 0:
        # bounded: the run ended within a minute of the kill (the controller polls every 2 s)
        assert child.info.end_time / 1000 - float(killed_at) < 60
    else:
        assert res.ok and child.info.status == "FINISHED"
    print(f"dead worker (retries {retries}), as printed:", lines[0])


# --------------------------------------------------------------------------------------------
# Scheduling: two 2-worker trials at once on 4 CPUs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_two_worker_trials_train_at_once_on_four_cpus(dp_ray, store, client, tmp_path,
                                                          control):
    # Each worker's first loss waits (up to 5 min) until the other trial's workers compute
    # theirs: both groups only get there if Ray runs them at the same time.
    arm(control, kind="trace", groups=2, wait_s=300)
    res = run_campaign(plan_for(spec(tmp_path, "dp_two", seeds=2)),
                       opts(store, tmp_path, "two", workers_per_trial=W))
    assert res.ok
    calls: dict[str, list] = {}
    for ln in (control / "trace.txt").read_text().splitlines():
        group, rank, t = ln.split()
        calls.setdefault(group, []).append((int(rank), float(t)))
    assert len(calls) == 2 and all({r for r, _ in c} == {0, 1} for c in calls.values())
    (a, b) = [[t for _, t in c] for c in calls.values()]
    assert max(min(a), min(b)) < min(max(a), max(b))  # the training intervals overlap
    tags = [c.data.tags for c in children_of(client, "dp_two", res)]
    assert [t[rr.WORKERS_TAG] for t in tags] == ["2", "2"]


# --------------------------------------------------------------------------------------------
# --resume after the campaign's driver was killed mid-stage
# --------------------------------------------------------------------------------------------


def _run_py(args: list[str], log: Path) -> subprocess.Popen:
    """experiments/run.py in a session of its own, its console into `log` (a pipe nobody reads
    while it runs could fill and stall it)."""
    return subprocess.Popen([sys.executable, str(ROOT / "experiments" / "run.py"), *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _last_checkpoint(building: Path) -> int:
    """The newest periodic checkpoint's step of the stage being trained (0: none yet)."""
    return max((int(p.name.split("_")[1]) for p in building.glob("stage1-*/step_*")
                if p.name.split("_")[1].isdigit()), default=0)


# Ray's node agents poll their raylet and leave a minute or two after it: they train nothing.
LINGERING = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "args=", "-s", str(sid)], capture_output=True, text=True,
                         check=False).stdout
    return [ln for ln in out.splitlines() if ln.strip()]


def _wait_gone(sid: int, timeout: float = 60.0) -> None:
    """Wait until the killed driver's session runs nothing but Ray's node agents (its raylet,
    trial and Ray Train workers ended with it), then end those."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [p for p in _session_processes(sid) if not p.startswith(LINGERING)]
        if not left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sid, signal.SIGKILL)
            return
        time.sleep(0.5)
    os.killpg(sid, signal.SIGKILL)
    pytest.fail(f"processes of the killed driver were still running {timeout:.0f} s later: "
                f"{left}")


STEPS = 40  # of the resumed stage: the workers outlive the killed driver by a few seconds


@pytest.mark.slow
def test_a_killed_driver_resumes_the_stage_to_the_uninterrupted_weights(tmp_path):
    """The driver (experiments/run.py) is SIGKILLed once the 2-worker stage has checkpointed
    step 8 of 40; --resume continues it from its last checkpoint (its first live window is past
    that step) and the published result equals an uninterrupted 2-worker run's."""
    path = spec(tmp_path, "dp_resume", overrides={
        "train.stage1.steps": STEPS, "train.stage1.ckpt_every": 4, "train.stage1.log_every": 4})
    common = [str(path), "--workers-per-trial", str(W), "--cache-dir", str(tmp_path / "cache"),
              "--progress-every", "0"]
    killed = [*common, "--tracking-uri", str(tmp_path / "mlruns"),
              "--work-dir", str(tmp_path / "killed")]
    proc = _run_py(killed, tmp_path / "killed.log")
    building = tmp_path / "killed" / "stages" / ".building"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and _last_checkpoint(building) < 8:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()
    os.kill(proc.pid, signal.SIGKILL)  # the driver only; Ray's reaper ends its processes
    proc.wait()
    _wait_gone(proc.pid)
    last = _last_checkpoint(building)
    assert 8 <= last < STEPS

    resumed = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *killed,
                              "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    steps = [int(s) for s in re.findall(rf"stage1 (\d+)/{STEPS}", resumed.stdout)]
    assert steps and steps[0] > last and steps[-1] == STEPS, resumed.stdout
    clean = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *common,
                            "--tracking-uri", str(tmp_path / "mlruns2"),
                            "--work-dir", str(tmp_path / "clean")],
                           capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    diff = max_rel_diff(stage_weights(tmp_path / "clean"), stage_weights(tmp_path / "killed"))
    assert diff <= WEIGHT_TOLERANCE
    print(f"resume after a driver kill at step {last} of {STEPS}: max relative weight difference "
          f"to the uninterrupted 2-worker run {diff:.3g}")


# --------------------------------------------------------------------------------------------
# The generation stage on 2 workers
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generation_stage_on_two_workers(dp_ray, store, client, tmp_path, control):
    arm(control)
    path = spec(tmp_path, "dp_generation", stages=["stage1", "generation"])
    one = run_campaign(plan_for(path), opts(store, tmp_path, "g1"))
    two = run_campaign(plan_for(path), opts(store, tmp_path, "g2", workers_per_trial=W))
    assert one.ok and two.ok
    (c1,) = children_of(client, "dp_generation", one)
    (c2,) = children_of(client, "dp_generation", two)
    g1 = load_file(str(tmp_path / "g1" / "dp_generation" / one.parent_run_id / "trials" /
                       "base_s0" / "generation" / "final" / "model.safetensors"))
    g2 = load_file(str(tmp_path / "g2" / "dp_generation" / two.parent_run_id / "trials" /
                       "base_s0" / "generation" / "final" / "model.safetensors"))
    assert max_rel_diff(g1, g2) <= WEIGHT_TOLERANCE
    arts = lambda run: sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert arts(c1) == arts(c2) and "generation.json" in arts(c2)
    assert c2.data.tags[rr.WORKERS_TAG] == "2"
    assert {k for k in c1.data.metrics if k.startswith("eval/")} == {
        k for k in c2.data.metrics if k.startswith("eval/")}
