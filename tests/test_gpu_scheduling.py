"""GPU scheduling proven without a GPU (issue 14): Ray with logical GPUs, fractional packing,
the device each trial picks, and what a trial does when its GPU share has no CUDA behind it.

Ray schedules logical GPUs (`ray.init(num_gpus=2)`) and hands their ids to trials
(`ray.get_gpu_ids()`, `CUDA_VISIBLE_DEVICES`) whether or not CUDA exists. Every campaign test
runs under both of Ray's conventions (the module fixture's params):
- `ray-sets-cvd` (Ray's default): each worker's CUDA_VISIBLE_DEVICES is its own GPU id, so
  the trial's GPU is `cuda:0` in its process;
- `noset` (`RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`, node started with
  `CUDA_VISIBLE_DEVICES=0,1`): every worker sees both GPUs, so the trial on GPU 1 must pick
  `cuda:1` — all trials on `cuda:0` would stack them on one card.
The failure paths are mode-independent and run under Ray's default only.
The trials run on CPU (`--device cpu`, the documented fallback) and record on their MLflow run
which GPU ids Ray gave them and which CUDA device that share maps to (`placement.gpu_slot`).
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
from campaign_helpers import campaign_runs, plan_for, ratio_arms, write_spec
from sftok_experiments.campaign import Options, init_ray, run_campaign
from sftok_experiments.placement import (
    DeviceUnavailableError,
    Placement,
    gpu_shortfall,
    gpu_slot,
    placement_tags,
    select_device,
)

# The trial function below is shipped to Ray workers by value (workers cannot import tests/).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

GPUS, CPUS, SHARE = 2, 2, 0.5  # 4 half-GPU trials fit at once (with half a CPU each)


# --------------------------------------------------------------------------------------------
# The device choice: a pure function
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu_ids, visible, slot", [
    ([0], "0", 0), ([1], "1", 0),  # Ray's default: the worker sees only its own GPU
    (["1"], "0,1", 1), (["0"], "0,1", 0),  # NOSET: the whole node's list
    (["3"], "2,3", 1), (["2"], "3,2", 1),  # a node restricted to some GPUs, any order
    ([1], None, 1),  # CUDA_VISIBLE_DEVICES unset: physical numbering
    (["GPU-bb"], "GPU-aa,GPU-bb", 1),  # UUIDs
    ([1, 0], "0,1", 1),  # several GPUs: the trial trains on the first
    ([], "0,1", None),  # no share
])
def test_gpu_slot(gpu_ids, visible, slot):
    assert gpu_slot(gpu_ids, visible) == slot


def test_gpu_slot_id_not_visible():
    with pytest.raises(DeviceUnavailableError, match="CUDA_VISIBLE_DEVICES=0 does not list"):
        gpu_slot(["1"], "0")


@pytest.mark.parametrize("requested, gpu_ids, visible, cuda, device", [
    ("auto", [1], "1", True, "cuda:0"),
    ("auto", ["1"], "0,1", True, "cuda:1"),
    ("cuda", ["1"], "0,1", True, "cuda:1"),
    ("auto", [], "0,1", True, "cpu"),  # no share: CPU, even where GPUs are visible
    ("auto", [], None, False, "cpu"),
    ("cpu", ["1"], "0,1", True, "cpu"),  # asked for CPU: kept even with a share
    ("cpu", ["1"], "0,1", False, "cpu"),  # the fallback when CUDA is missing
    ("cuda:1", [], None, True, "cuda:1"),  # explicit: kept as given
])
def test_select_device(requested, gpu_ids, visible, cuda, device):
    assert select_device(requested, gpu_ids, visible, cuda, "node-a") == device


@pytest.mark.parametrize("requested, gpu_ids", [("auto", [0]), ("cuda", [0]), ("cuda:0", [])])
def test_no_cuda_is_one_line_naming_node_and_fix(requested, gpu_ids):
    with pytest.raises(DeviceUnavailableError) as e:
        select_device(requested, gpu_ids, "0", False, "node-a")
    msg = str(e.value)
    assert "\n" not in msg and "node node-a" in msg and "CUDA is not available" in msg
    assert "--device cpu" in msg and "--gpus-per-trial 0" in msg


def test_placement_tags():
    p = Placement("node-a", "10.0.0.1", ("1",), "0,1", False, 0.5, 12.5)
    assert placement_tags(p, "cpu") == {
        "placement.node": "node-a", "placement.node_ip": "10.0.0.1",
        "placement.ray_gpu_ids": "1", "placement.cuda_visible_devices": "0,1",
        "placement.cuda_available": "false", "placement.gpu_slot": "cuda:1",
        "placement.device": "cpu", "placement.start": "12.500", "placement.gpu_share": "0.5"}
    none = placement_tags(Placement("n", "", (), None, False, None, 0.0), None)
    assert none["placement.gpu_slot"] == "none" and none["placement.device"] == "none"
    assert none["placement.cuda_visible_devices"] == "<unset>" and "placement.gpu_share" not in none
    odd = placement_tags(Placement("n", "", ("1",), "0", False, 1.0, 0.0), "cpu")
    assert odd["placement.gpu_slot"] == "not visible"


def test_gpu_shortfall():
    assert gpu_shortfall(0.5, 2) is None and gpu_shortfall(2, 2) is None
    assert gpu_shortfall(0, 0) is None
    msg = gpu_shortfall(0.5, 0)
    assert "--gpus-per-trial 0.5 but Ray found 0 GPU(s)" in msg and "--ray-address" in msg


def test_cuda_without_share_is_an_error():
    with pytest.raises(DeviceUnavailableError, match="holds no GPU share.*--gpus-per-trial"):
        select_device("cuda", [], "0,1", True, "node-a")


# --------------------------------------------------------------------------------------------
# Campaigns on 2 logical GPUs
# --------------------------------------------------------------------------------------------


MODES = ["ray-sets-cvd", "noset"]
both_modes = pytest.mark.parametrize("logical_gpus", MODES, indirect=True)
default_mode = pytest.mark.parametrize("logical_gpus", MODES[:1], indirect=True)


@pytest.fixture(scope="module")
def logical_gpus(request):
    """Ray with 2 logical GPUs and 2 CPUs, under one of Ray's CUDA_VISIBLE_DEVICES modes
    (request.param; one Ray session per mode, shared by the module's tests)."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
    saved = {k: os.environ.get(k) for k in env}
    if ray.is_initialized():  # another module's session: it has no GPUs
        ray.shutdown()
    if request.param == "noset":
        os.environ.update(env)  # the raylet, and so every worker, inherits them
    try:
        assert init_ray(num_cpus=CPUS, num_gpus=GPUS)
        assert ray.cluster_resources().get("GPU") == GPUS
        yield request.param
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spec_file(tmp_path: Path, name: str, ratios: list[float], seeds: int) -> Path:
    return write_spec(tmp_path, name, arms=ratio_arms(ratios), seeds=seeds)


def make_gpu_trial(barrier: Path, wait_for: int):
    """A trial that places itself exactly as `run_trial` does, then waits until `wait_for`
    trials have started (or 120 s passed) and holds 1 s more, so the trials Ray lets run at
    once really overlap; its end time comes with `report_final`."""
    barrier = str(barrier)

    def gpu_trial(config):
        import tempfile

        from sftok_experiments.protocol import (
            place_trial,
            report_final,
            resolved_config,
            trial_key,
        )

        place_trial(config, resolved_config(config))
        Path(barrier, trial_key(config)).touch()
        deadline = time.time() + 120
        while len(os.listdir(barrier)) < wait_for and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        report_final({"placed": 1.0}, Path(tempfile.mkdtemp()))

    return gpu_trial


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (an end at t comes before a start at t)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = now = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def check_placement(runs, mode: str, share: float) -> dict:
    """The invariants of issue 14 on the runs' `placement.*` tags; returns what was observed."""
    tags = [r.data.tags for r in runs]
    spans = [(float(t["placement.start"]), float(t["placement.end"])) for t in tags]
    per_gpu: dict[str, list] = {}
    for t, span in zip(tags, spans):
        ids = t["placement.ray_gpu_ids"].split(",")
        assert len(ids) == 1 and ids[0] in {"0", "1"}, t  # a half share is one GPU
        visible = t["placement.cuda_visible_devices"]
        # The CUDA device of the share is the trial's own GPU within what it sees ...
        assert t["placement.gpu_slot"] == f"cuda:{visible.split(',').index(ids[0])}"
        # ... which under each of Ray's conventions is:
        if mode == "noset":
            assert visible == "0,1" and t["placement.gpu_slot"] == f"cuda:{ids[0]}"
        else:
            assert visible == ids[0] and t["placement.gpu_slot"] == "cuda:0"
        assert t["placement.gpu_share"] == f"{share:g}"
        assert t["placement.node"] == platform.node()
        per_gpu.setdefault(ids[0], []).append(span)
    peak = max_overlap(spans)
    peak_gpu = {g: max_overlap(s) for g, s in per_gpu.items()}
    assert peak <= int(GPUS / share) and peak <= int(CPUS / share)  # never more than fit
    assert all(n * share <= 1 for n in peak_gpu.values()), peak_gpu  # no GPU over capacity
    return {"peak": peak, "peak_per_gpu": peak_gpu,
            "slots": sorted((t["placement.ray_gpu_ids"], t["placement.gpu_slot"]) for t in tags)}


@both_modes
def test_half_gpu_trials_pack_two_per_gpu(logical_gpus, store, client, tmp_path):
    """Trials at 0.5 GPU / 0.5 CPU on 2 logical GPUs: 4 at once, 2 per GPU, each trial's
    device its own GPU; --device cpu runs them on CPU and they still record the GPU slot.
    Ray's default mode runs 6 trials (2 more than fit, so the cap is exercised); `noset`, whose
    point is the device index, runs 4 (each start of a Ray trial costs seconds)."""
    barrier = tmp_path / "started"
    barrier.mkdir()
    name = f"gpu_pack_{logical_gpus.replace('-', '_')}"
    ratios = [0.5, 1.0] if logical_gpus == "noset" else [0.5, 0.8, 1.0]
    res = run_campaign(plan_for(spec_file(tmp_path, name, ratios, 2)), Options(
        tracking=str(store), work_dir=str(tmp_path / "runs"), prepare_teacher=False,
        cpus_per_trial=SHARE, gpus_per_trial=SHARE, device="cpu",
        trial_fn=make_gpu_trial(barrier, wait_for=4)))
    assert res.exit_code == 0, [t.error for t in res.trials]
    _, runs = campaign_runs(client, name, res.parent_run_id)
    assert len(runs) == 2 * len(ratios) and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert r.data.tags["placement.device"] == "cpu"  # asked for: the CPU fallback
        assert r.data.tags["placement.cuda_available"] == "false"
        assert "placement.gpu_model" not in r.data.tags  # only on CUDA
    seen = check_placement(runs, logical_gpus, SHARE)
    print(f"\n[{logical_gpus}] observed: {seen}")
    # The barrier lets all that fit start together: fractional shares did pack 4 at once,
    # two on each GPU, and both GPUs were used.
    assert seen["peak"] == 4 and seen["peak_per_gpu"] == {"0": 2, "1": 2}
    if logical_gpus == "noset":  # not all on cuda:0
        assert {s for _, s in seen["slots"]} == {"cuda:0", "cuda:1"}


@default_mode
def test_gpu_share_without_cuda_fails_naming_node(logical_gpus, store, client, tmp_path):
    """The real trial (`run_trial`), device auto, half a GPU, no CUDA here: it fails before any
    training with one line naming this node and the fixes, and its run shows what Ray gave it."""
    name = f"gpu_nocuda_{logical_gpus.replace('-', '_')}"
    res = run_campaign(plan_for(spec_file(tmp_path, name, [1.0], 1)), Options(
        tracking=str(store), work_dir=str(tmp_path / "runs"), prepare_teacher=False,
        cpus_per_trial=SHARE, gpus_per_trial=SHARE))
    assert res.exit_code == 1
    (run,) = campaign_runs(client, name, res.parent_run_id)[1]
    t = run.data.tags
    assert run.info.status == "FAILED"
    assert "DeviceUnavailableError: trial on node" in t["error"], t["error"]
    assert f"node {platform.node()}" in t["error"] and "--device cpu" in t["error"]
    assert t["placement.device"] == "none" and t["placement.ray_gpu_ids"] in {"0", "1"}
    assert t["placement.gpu_share"] == "0.5" and t["placement.cuda_available"] == "false"


@default_mode
def test_share_larger_than_the_machine_stops_before_ray_trials(logical_gpus, store, client,
                                                              tmp_path):
    """3 GPUs per trial on a 2-GPU Ray: one line and exit 1, instead of trials pending forever."""
    name = f"gpu_short_{logical_gpus.replace('-', '_')}"
    res = run_campaign(plan_for(spec_file(tmp_path, name, [1.0], 1)), Options(
        tracking=str(store), work_dir=str(tmp_path / "runs"), prepare_teacher=False,
        gpus_per_trial=3, trial_fn=make_gpu_trial(tmp_path, wait_for=1)))
    assert res.exit_code == 1 and res.trials[0].status == "NOT RUN"
    assert res.setup_error.startswith("--gpus-per-trial 3 but Ray found 2 GPU(s)")


@pytest.mark.slow
@both_modes
def test_smoke_campaign_on_half_gpus(logical_gpus, store, client, tmp_path):
    """The real pipeline (`experiments/run.py`, smoke preset), 4 trials at --gpus-per-trial 0.5
    --cpus-per-trial 0.5 --device cpu on 2 logical GPUs."""
    from sftok_experiments.cli import main

    name = f"gpu_smoke_{logical_gpus.replace('-', '_')}"
    rc = main([str(spec_file(tmp_path, name, [0.5, 1.0], 2)), "--tracking-uri", str(store),
               "--work-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
               "--gpus-per-trial", "0.5", "--cpus-per-trial", "0.5", "--device", "cpu"])
    assert rc == 0
    _, runs = campaign_runs(client, name)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["placement.device"] == "cpu" for r in runs)
    assert all(any(k.startswith("eval/") for k in r.data.metrics) for r in runs)
    seen = check_placement(runs, logical_gpus, SHARE)
    print(f"\n[{logical_gpus}] smoke observed: {seen}")
    assert seen["peak"] >= 2  # fractional shares let real trials share a GPU
