"""The prepared device check (issue 22) cannot rot before a GPU comes: its CPU rehearsal
(`scripts/device_check.py --device cpu --quick`) runs here, every step at `smoke` size, and its
report is checked against the documented schema (`scripts/device_report.py`, docs/device_check.md)
and for the answers that hold on any machine. Also: the bare GPU image (no Ray, MLflow,
pydantic, ...) is simulated by blocking those imports, and the steps that need them are skipped
with the reason while the others run; a step past its time box is killed and recorded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import device_check
import device_report

from sftok.train.benchmark import read_throughput

# What the lent GPU image lacks (docs/device_check.md).
ABSENT_ON_GPU_IMAGE = ("ray", "mlflow", "pydantic", "lpips", "torch_fidelity", "optuna",
                       "webdataset", "jupytext")
BLOCKER = '''
import importlib.abc, os, sys
BLOCK = set(os.environ["SFTOK_BLOCK_MODULES"].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
'''


def _check(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "device_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env, check=False)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    base = tmp_path_factory.mktemp("device_check")
    t0 = time.time()
    # Time boxes x4: a shared CI machine under load must not turn slowness into timeouts.
    proc = _check(["--device", "cpu", "--quick", "--out", str(base / "out"), "--work",
                   str(base / "work"), "--threads", "2", "--box-scale", "4"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return base / "out", json.loads((base / "out" / "report.json").read_text()), time.time() - t0


def _step(report: dict, name: str) -> dict:
    return next(s for s in report["steps"] if s["name"] == name)


def test_rehearsal_report_has_the_documented_schema(rehearsal):
    out, report, _ = rehearsal
    # Only the three report files: scratch (MLflow store, work dirs) stays in --work.
    assert sorted(p.name for p in out.iterdir()) == ["device_check.log", "report.json",
                                                     "report.md"]
    assert set(report) == set(device_report.REPORT_KEYS)
    assert report["schema"] == device_report.SCHEMA and report["finished"] is True
    assert (report["mode"], report["device"], report["quick"]) == ("rehearsal", "cpu", True)
    assert [s["name"] for s in report["steps"]] == [s.name for s in device_check.STEPS]
    for s in report["steps"]:
        assert set(s) == set(device_report.STEP_KEYS) and s["status"] in device_report.STATUSES
        if s["name"] == "ray_train" and s["status"] == "skipped":  # until issue 19 merges
            assert "not available in this checkout" in s["reason"]
            continue
        assert s["status"] == "ok", (s["name"], s["reason"])
        assert set(device_report.RESULT_KEYS[s["name"]]) <= set(s["result"]), s["name"]
        assert 0 < s["seconds"] <= s["box_s"]
    # The throughput record is the one schema Table 5 reads (benchmark.py --json's).
    record = read_throughput(out / "report.json")
    assert record == report["throughput"] and record["device_name"] == "cpu"
    assert [(r["stage"], r["compiled"]) for r in record["rows"]] == [
        ("stage1", None), ("stage2", None), ("stage3", None),
        ("stage2", "eager"), ("stage1", "eager"), ("stage3", "eager")]
    assert [r["mode"] for r in record["rows"]] == ["eager"] * 3 + ["compile (eager)"] * 3
    for r in record["rows"]:
        assert r["preset"] == "smoke" and r["images_per_s"] > 0 and r["model_flops"] > 0
        assert r["mfu_measured"] > 0 and r["mfu_datasheet"] is None  # fp32 on CPU
    md = (out / "report.md").read_text()
    assert md.startswith("# Device check: cpu (rehearsal)")
    assert all(f"| {s.name} |" in md for s in device_check.STEPS)
    assert "## Training throughput" in md and "## Golden equivalence" in md
    assert "## Placement tags read back from MLflow" in md and "| psnr_s8 | psnr_s1 |" in md


def test_rehearsal_answers_what_holds_on_any_machine(rehearsal):
    _, report, wall = rehearsal
    golden = _step(report, "golden")["result"]
    for precision in ("fp32", "bf16"):
        assert (golden[precision]["passed"], golden[precision]["failed"]) == (9, 0)
        assert len(golden[precision]["tensors"]) == 13
    path = _step(report, "gpu_path")["result"]
    assert [s["stage"] for s in path["steps"]] == ["stage1", "stage2", "stage3"]
    assert all(s["library_reads"] == [] and s["cuda_syncs"] is None for s in path["steps"])
    assert path["compile_fallback"]["warnings"] == 1 and path["compile_fallback"]["same_numbers"]
    assert path["sdpa"][0]["dispatched"]  # the attention op the model reached
    biggest = _step(report, "max_batch")["result"]
    assert (biggest["largest_ok"], biggest["stopped"]) == (32, "limit")  # CPU: never OOM
    decode = _step(report, "decode")["result"]["runs"][0]
    assert decode["steps"] == 8 and decode["decode_over_one_pass"] > 1
    trials = _step(report, "campaign")["result"]["trials"]
    assert len(trials) == 3 and {t["status"] for t in trials} == {"FINISHED"}
    assert {t["placement"]["device"] for t in trials} == {"cpu"}
    print(f"rehearsal wall time: {wall:.0f} s")


def test_table5_renders_from_the_report(rehearsal, tmp_path):
    out, _, _ = rehearsal
    proc = subprocess.run([sys.executable, str(ROOT / "analysis" / "render.py"), "table5_compute",
                           "-p", f"benchmark_json={out / 'report.json'}", "--out",
                           str(tmp_path), "--tracking-uri", str(tmp_path / "no-store")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "table5_compute" / "table5.md").read_text()
    assert "| ours (projected)    | smoke" in table and "| mode " in table


def test_bare_gpu_image_skips_what_it_lacks_and_runs_the_rest(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"),
           "SFTOK_BLOCK_MODULES": ",".join(ABSENT_ON_GPU_IMAGE)}
    proc = _check(["--device", "cpu", "--quick", "--steps", "env,gpu_path,campaign,ray_train",
                   "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                   "--box-scale", "4"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    status = {s["name"]: (s["status"], s["reason"]) for s in report["steps"]}
    assert status["env"] == ("ok", None) and status["gpu_path"] == ("ok", None)
    for step in ("campaign", "ray_train"):
        assert status[step][0] == "skipped" and "needs ray, mlflow, pydantic" in status[step][1]
    packages = _step(report, "env")["result"]["packages"]
    assert all(packages[m] is None for m in ABSENT_ON_GPU_IMAGE if m in packages)
    assert packages["timm"] and packages["safetensors"]


def test_a_step_past_its_time_box_is_killed_and_recorded(tmp_path):
    check = device_check.Check(device_check.parse(["--out", str(tmp_path / "out"), "--work",
                                                   str(tmp_path / "work"), "--steps", "env"]),
                               "cpu", True, None)
    entry = check.entry("env")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               start_new_session=True)
    run = device_check._Running(device_check.STEPS[0], entry, sleeper, time.time(), 1.0,
                                tmp_path / "none.json", open(tmp_path / "log", "a"),  # noqa: SIM115
                                tmp_path / "log")
    check.running.append(run)
    t0 = time.time()
    check.wait(run)
    assert time.time() - t0 < 15 and sleeper.poll() is not None  # killed, not waited out
    assert entry["status"] == "timeout" and "time box (1 s)" in entry["reason"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert _step(saved, "env")["status"] == "timeout"


def test_command_line_refusals_are_one_line(tmp_path):
    proc = _check(["--out", str(tmp_path), "--steps", "env,warp_drive"])
    assert proc.returncode == 2 and "unknown step(s) warp_drive" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    listed = _check(["--list"])
    assert listed.returncode == 0 and all(s.name in listed.stdout for s in device_check.STEPS)


def test_a_step_ends_when_its_driver_is_killed_outright(tmp_path):
    """Steps run in sessions of their own; a SIGKILLed driver (a device tool's time limit)
    must not leave one holding the GPU: it ends itself, and what it started, within seconds."""
    import signal

    state = tmp_path / "state.json"
    # A stand-in driver: writes the state, starts the step, waits.
    stand_in = ("import json, os, subprocess, sys, time; s = json.loads(sys.argv[4]); "
                "s['driver'] = os.getpid(); open(sys.argv[3], 'w').write(json.dumps(s)); "
                "p = subprocess.Popen([sys.argv[1], sys.argv[2], '--run-step', 'golden', "
                "'--state', sys.argv[3]], start_new_session=True); print(p.pid, flush=True); "
                "time.sleep(120)")
    driver = subprocess.Popen(
        [sys.executable, "-c", stand_in, sys.executable, str(SCRIPTS / "device_check.py"),
         str(state),
         json.dumps({"device": "cpu", "quick": True, "work": str(tmp_path),
                     "results": str(tmp_path / "golden.json"),
                     "deadline": time.time() + 120, "threads": 1})],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    step = int(driver.stdout.readline())
    time.sleep(1)  # killed while the step may still be starting: it must end all the same
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 15
    while time.time() < deadline:
        if not _alive(step):
            break
        time.sleep(0.2)
    else:
        os.killpg(step, signal.SIGKILL)
        pytest.fail("the step outlived its killed driver")


def _alive(pid: int) -> bool:
    """Running (a zombie left for a non-reaping init counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.mark.parametrize("role_tags", [True, False], ids=["role-tagged", "untagged-parents"])
def test_campaign_trials_are_read_back_through_the_run_record(tmp_path, role_tags):
    """The device check finds the newest campaign's trials by the run record's rules and
    names: written here as the runner writes them (`rr.trial_tags`, `placement_tags`), read
    back by `_trial_runs`, also from a store whose parent runs carry no role tag."""
    pytest.importorskip("mlflow")
    import device_steps
    from sftok_experiments.placement import Placement, placement_tags
    from sftok_experiments.tracking import client_for

    from sftok import run_record as rr

    client = client_for(rr.store_location(tmp_path / "mlruns").uri)
    exp = client.create_experiment(rr.experiment_name("ablation_replace_ratio"))
    where = Placement("node-a", "10.0.0.1", ("0",), None, True, 0.25, 1.0)

    def campaign(seeds: list[int], started: int) -> None:
        tags = {rr.ROLE_TAG: rr.PARENT_ROLE} if role_tags else {}
        parent = client.create_run(exp, tags=tags, start_time=started).info.run_id
        for seed in seeds:
            key = f"arm_s{seed}"
            child = client.create_run(exp, start_time=started + 1 + seed, tags={
                **rr.trial_tags(parent_id=parent, arm="arm", seed=seed, key=key,
                                spec="ablation_replace_ratio", preset="smoke", ray_trial_id="t",
                                stages=["stage1"], arm_values={}, search_values={}),
                **placement_tags(where, "cpu")}).info.run_id
            client.log_metric(child, rr.eval_key(rr.step_metric("psnr", 8)), 10.0 + seed)
            client.log_metric(child, rr.eval_key("token_top1"), 0.5)  # not shown
            client.set_terminated(child)

    campaign([0], 1_000)  # an older campaign: not read
    campaign([1, 0], 2_000)
    trials = device_steps._trial_runs(tmp_path, "ablation_replace_ratio")
    assert [t["trial"] for t in trials] == ["arm_s0", "arm_s1"]  # oldest first
    assert {t["status"] for t in trials} == {"FINISHED"} and trials[0]["error"] is None
    assert trials[0]["placement"] == {k.removeprefix("placement."): v
                                      for k, v in placement_tags(where, "cpu").items()}
    assert trials[0]["placement"]["gpu_share"] == "0.25"
    assert [t["metrics"] for t in trials] == [{"psnr_s8": 10.0}, {"psnr_s8": 11.0}]
    assert device_steps._trial_runs(tmp_path, "no_such_spec") == []
