"""Reliability (issue 13): errors that survive Ray, a store two campaigns can open at once,
bad values refused before any compute. The Ray campaign checks live in test_runner.py."""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from campaign_helpers import (
    RATIOS,
    ROOT,
    campaign_runs,
    echo_lines,
    plan_for,
    ratio_arms,
    trial_fn_ref,
    write_spec,
)
from sftok_experiments import cli
from sftok_experiments.spec import SpecError

from sftok.train import NonFiniteLossError


@pytest.mark.parametrize("exc", [
    NonFiniteLossError("stage1", 2, 5, "loss", float("nan"), Path("/x/ckpt")),
    SpecError("spec.yaml", "arms.grid", "bad"),
])
def test_errors_rebuild_with_their_fields(exc):
    """Ray copies (copy.copy) and pickles a trial's exception; the default rebuild called
    __init__ with the message alone and raised TypeError instead."""
    for back in (pickle.loads(pickle.dumps(exc)), copy.copy(exc)):
        assert type(back) is type(exc) and str(back) == str(exc)
        assert vars(back).keys() == vars(exc).keys()


def test_guarded_keeps_the_text_of_an_exception_ray_cannot_rebuild():
    from sftok_experiments.protocol import _survives_ray, one_line

    class Fussy(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    assert not _survives_ray(Fussy(1, 2)) and _survives_ray(ValueError("x"))
    assert one_line(ValueError("two\nlines")) == "ValueError: two lines"


def test_trial_processes_exit_quietly_on_sigterm(capsys):
    """Ray's SIGTERM handler raises SystemExit; inside a finaliser Python would print it as
    'Exception ignored in ...'. Other unraisable errors still reach the default hook."""
    from sftok_experiments.protocol import _quiet_exit_hook

    class RaisesWhenCollected:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    previous, sys.unraisablehook = sys.unraisablehook, _quiet_exit_hook
    try:
        RaisesWhenCollected(SystemExit(1))  # collected at once (reference count 0)
        assert capsys.readouterr().err == ""
        RaisesWhenCollected(ValueError("real problem"))
        assert "real problem" in capsys.readouterr().err
    finally:
        sys.unraisablehook = previous


@pytest.mark.parametrize("args,expected", [
    (["--set", "train.stage2.steps=-5"], "--set: train.stage2.steps: must be >= 1, got -5"),
    (["--set", "train.stage1.optim.lr=-1"], "--set: train.stage1.optim.lr: must be > 0"),
    (["--set", "train.stage1.batch_size=0"], "--set: train.stage1.batch_size: must be >= 1"),
    (["--set", "eval.decode_steps=[0]"], "--set: eval.decode_steps: must be a non-empty list"),
    (["--data", "imagenet=/nonexistent/imagenet"], "is not a directory"),
])
def test_dry_run_refuses_bad_values(args, expected, capsys):
    assert cli.main(["ablation_replace_ratio", "--preset", "smoke", "--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_a_directory_is_not_a_spec(tmp_path, capsys):
    assert cli.main([str(tmp_path), "--dry-run"]) == 2
    assert "is a directory, not a spec" in capsys.readouterr().err


def test_two_campaigns_create_a_new_sqlite_store_at_once(tmp_path):
    """Both processes open the same fresh store at the same instant (before the fix, one died
    in MLflow's schema migration, 3 times out of 3) and get or create the same experiment."""
    script = tmp_path / "open_store.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from sftok import run_record as rr
        from sftok_experiments import tracking as trk
        import mlflow  # imported before the start line, so both start together
        store = rr.store_location(sys.argv[1])
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        client = trk.client_for(store.uri)
        exp = trk.get_experiment(client, "shared", store.artifact_root)
        print("exp", exp, client.get_experiment(exp).tags[rr.EXPERIMENT_KIND_TAG])
    """))
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    start = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, str(script), uri, start], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [o.strip().splitlines()[-1] for o in outs]
    assert lines[0] == lines[1] and lines[0].endswith(" custom_model_development")


# --------------------------------------------------------------------------------------------
# python -m sftok.evaluate: arguments checked before loading, file errors in one line
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A smoke-size tokenizer + teacher checkpoint, and broken copies of the tokenizer's."""
    import os
    import shutil

    import torch

    from sftok.checkpoint import save_model
    from sftok.config import proxy_grid
    from sftok.presets import get_preset
    from sftok.teacher import FrozenTeacher, MaskGitVQGAN
    from sftok.tokenizer import SFTok

    d = tmp_path_factory.mktemp("ckpts")
    cfg = get_preset("smoke")
    tok = SFTok(cfg.tokenizer, cfg.teacher.codebook_size, proxy_grid(cfg))
    save_model(d / "tok", tok, cfg)
    save_model(d / "teacher", FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size),
               cfg.teacher)
    data = (d / "tok" / "model.safetensors").read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("corrupt", b"junk" * 64)):
        shutil.copytree(d / "tok", d / name)
        (d / name / "model.safetensors").write_bytes(content)
    shutil.copytree(d / "tok", d / "noconfig")
    (d / "noconfig" / "config.json").unlink()

    class Hostile:  # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"w": Hostile()}, d / "hostile.bin")
    return d


@pytest.mark.parametrize("args,expected", [
    (["{d}/missing"], "{d}/missing: checkpoint directory not found"),
    (["{d}/noconfig"], "{d}/noconfig/config.json: missing"),
    (["{d}/truncated", "--teacher-checkpoint", "{d}/teacher"],
     "{d}/truncated/model.safetensors: not a readable .safetensors file"),
    (["{d}/corrupt", "--teacher-checkpoint", "{d}/teacher"],
     "{d}/corrupt/model.safetensors: not a readable .safetensors file"),
    (["{d}/tok", "--teacher-weights", "{d}/hostile.bin"],
     "{d}/hostile.bin: refused, not a plain weights file"),
    (["{d}/hostile.bin", "--official", "--teacher-weights", "{d}/hostile.bin"],
     "{d}/hostile.bin: refused, not a plain weights file"),
    (["{d}/tok", "--steps", "4", "0"], "--steps: must be a non-empty list of integers >= 1"),
    (["{d}/tok", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["{d}/tok", "--max-images", "0"], "--max-images: must be >= 1"),
    (["{d}/tok", "--data", "imagenet={d}/nope"], "--data imagenet={d}/nope: "),
])
def test_evaluate_cli_bad_input_is_one_line(checkpoints, args, expected, capsys, monkeypatch):
    from sftok.evaluate import __main__ as cli

    def no_loading(*a, **k):  # argument errors must be found before anything is loaded
        raise AssertionError("loaded a model for arguments that were already bad")

    if "--teacher" not in " ".join(args) and "missing" not in args[0]:
        monkeypatch.setattr(cli, "_load", no_loading)
    d = str(checkpoints)
    rc = cli.main([a.format(d=d) for a in args] + ["--device", "cpu", "--no-progress",
                                                   "--cache-dir", f"{d}/cache"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: " + expected.format(d=d)), err
    assert "weights_only=False" not in err


# --------------------------------------------------------------------------------------------
# Campaigns on Ray with fake trial functions (the report protocol, sftok_experiments.protocol)
# --------------------------------------------------------------------------------------------


class Fussy(Exception):
    """An exception Ray cannot rebuild from its args (a third-party library's, say)."""

    def __init__(self, a, b):
        super().__init__(f"fussy {a} and {b}")


def make_raising(log_dir: Path, kind: str):
    log_dir = str(log_dir)

    def raising_trial(config):
        from sftok_experiments.protocol import report_train, trial_key

        key = trial_key(config)
        Path(log_dir, f"{key}.{time.time_ns()}").write_text("ran")
        report_train("stage1", 1, {"loss": 1.0})
        if kind == "nonfinite":
            from sftok.train import NonFiniteLossError

            raise NonFiniteLossError("stage1", 2, 2, "loss", float("nan"), None)
        raise Fussy(1, 2)

    return raising_trial


def make_reporting(log_dir: Path, skipped_train: int = 0, skipped_val: int = 0):
    """Reports 3 steps per stage with loss and images/s, and skipped-file counts."""
    log_dir = str(log_dir)

    def reporting_trial(config):
        import tempfile

        from sftok_experiments.protocol import (
            report_final,
            report_stage_done,
            report_train,
            trial_key,
        )

        key = trial_key(config)
        Path(log_dir, f"{key}.{time.time_ns()}").write_text("ran")
        step = 0
        for stage in config["trial"]["stages"]:
            for _ in range(3):
                step += 1
                report_train(stage, step, {"loss": 2.0, "images_per_s": 8.0,
                                           "data_skipped": skipped_train})
            report_stage_done(stage, step)
        out = Path(tempfile.mkdtemp()) / "artifacts"
        out.mkdir()
        report_final({"psnr_s1": 1.0, "skipped_images": skipped_val}, out)

    return reporting_trial


@pytest.fixture(scope="module")
def ray_store(ray_session, store, client):
    """The module's Ray session and MLflow store; the fake trials travel to Ray by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return store, client


def _spec(tmp_path, name, n_arms=1) -> Path:
    return write_spec(tmp_path, name, arms=ratio_arms(RATIOS[:n_arms]))


def _campaign(tmp_path, store, name, trial_fn, n_arms=1, echo=None, **opts):
    from sftok_experiments.campaign import Options, run_campaign

    spec_path = _spec(tmp_path, name, n_arms)
    options = Options(tracking=str(store), work_dir=str(tmp_path / "runs"),
                      prepare_teacher=False, trial_fn=trial_fn, **opts)
    if echo is not None:
        options.echo = echo
    return run_campaign(plan_for(spec_path), options), spec_path


def test_deterministic_failure_keeps_its_message_and_is_not_retried(ray_store, tmp_path):
    store, client = ray_store
    logs = tmp_path / "logs"
    logs.mkdir()
    lines, echo = echo_lines()
    res, _ = _campaign(tmp_path, store, "rel_nonfinite", make_raising(logs, "nonfinite"),
                       echo=echo, max_failures=2)
    assert len(list(logs.iterdir())) == 1  # no retry although 2 were allowed
    assert not any("retrying" in ln for ln in lines)
    (trial,) = res.trials
    assert trial.status == "FAILED"
    assert trial.error.startswith("NonFiniteLossError: stage1: non-finite loss (nan) at step 2")
    failed = [ln for ln in lines if "FAILED:" in ln]
    assert len(failed) == 1 and "NonFiniteLossError: stage1" in failed[0]
    assert client.get_run(trial.run_id).data.tags["error"] == trial.error


def test_error_ray_cannot_rebuild_keeps_its_text_and_is_retried(ray_store, tmp_path):
    store, _ = ray_store
    logs = tmp_path / "logs"
    logs.mkdir()
    lines, echo = echo_lines()
    res, _ = _campaign(tmp_path, store, "rel_fussy", make_raising(logs, "fussy"), echo=echo,
                       max_failures=1)
    assert len(list(logs.iterdir())) == 2  # not deterministic: retried once
    assert sum("retrying" in ln and "Fussy: fussy 1 and 2" in ln for ln in lines) == 1
    assert res.trials[0].error == "Fussy: fussy 1 and 2"


def test_progress_lines_and_skipped_counts(ray_store, tmp_path):
    store, client = ray_store
    logs = tmp_path / "logs"
    logs.mkdir()
    lines, echo = echo_lines()
    res, _ = _campaign(tmp_path, store, "rel_progress", make_reporting(logs, 2, 3), echo=echo,
                       progress_every=0)
    assert res.exit_code == 0
    progress = [ln.split("     ", 1)[-1].strip() for ln in lines if " img/s" in ln]
    # smoke: 3 steps per stage; stage 2's steps are counted from its own start
    assert progress[0] == "stage1 1/3 (33%)  loss 2  8.0 img/s"
    assert progress[-1] == "stage2 3/3 (100%)  loss 2  8.0 img/s"
    assert any("ETA" in ln for ln in progress) and len(progress) == 6
    assert any(ln.startswith("data: undecodable image files skipped — training: up to 2 "
                             "per trial") and "validation: 3 per trial" in ln for ln in lines)
    run = client.get_run(res.trials[0].run_id)
    assert run.data.metrics["eval/skipped_images"] == 3
    assert run.data.metrics["train/stage1/data_skipped"] == 2
    parent = client.get_run(res.parent_run_id).data.tags
    assert (parent["data_skipped.train"], parent["data_skipped.val"]) == ("2", "3")
    # Throttled: the default interval prints the first report of a trial only.
    lines2, echo2 = echo_lines()
    _campaign(tmp_path, store, "rel_progress2", make_reporting(logs), echo=echo2)
    assert sum(" img/s" in ln for ln in lines2) == 1


def test_ctrl_c_between_trials_is_killed_with_the_exact_resume_command(ray_store, tmp_path):
    """SIGINT to the driver's process group (a terminal's Ctrl-C) after the first of three
    trials: parent KILLED (it was FAILED), a resume command naming the store, work and cache
    dirs actually used (it named none), no Tuner.restore advice; pasting it finishes the rest."""
    import os
    import shlex
    import signal

    import ray

    store, client = ray_store
    logs = tmp_path / "logs"
    logs.mkdir()
    spec_path = _spec(tmp_path, "rel_ctrlc", n_arms=3)
    trial_fn = trial_fn_ref(tmp_path, __file__, "reliability_tests",
                            f"mod.make_reporting(Path({str(logs)!r}))")
    # Ctrl-C must work even where this test runs with SIGINT ignored (a background job).
    sigint = ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
              "signal.default_int_handler); sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, "-c", sigint, str(ROOT / "experiments" / "run.py"), str(spec_path),
           "--tracking-uri", str(store), "--work-dir", "runs-x", "--cache-dir", "cache-x",
           "--ray-address", ray.get_runtime_context().gcs_address, "--trial-fn",
           trial_fn, "--no-teacher", "--max-concurrent", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "finished in" in line:
            os.killpg(proc.pid, signal.SIGINT)  # our own child's process group
    text = "".join(out)
    assert proc.wait(timeout=120) == 130, text
    assert "Tuner.restore" not in text and "Traceback" not in text
    hint = next(ln for ln in out if ln.startswith("continue with: ")).removeprefix(
        "continue with: ").strip()
    args = shlex.split(hint)
    assert args[args.index("--tracking-uri") + 1] == f"sqlite:///{store / 'mlflow.db'}"
    assert args[args.index("--work-dir") + 1] == str(tmp_path / "runs-x")
    assert args[args.index("--cache-dir") + 1] == str(tmp_path / "cache-x")
    assert args[-1] == "--resume" and "--max-concurrent" in args
    (parent,) = campaign_runs(client, "rel_ctrlc")[0]
    assert parent.info.status == "KILLED" and parent.data.tags["interrupted"] == "true"

    for f in logs.iterdir():
        f.unlink()
    done = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list(logs.iterdir())) == 2  # the two trials not run before, once each
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_resume_command_replaces_store_options():
    cmd = cli.resume_command(["spec", "--tracking-uri=a", "--seeds", "2", "--work-dir", "w",
                              "--resume", "--set", "x=1 2"], "sqlite:////s/m.db", Path("/w"),
                             Path("/c"))
    assert cmd.endswith("spec --seeds 2 --set 'x=1 2' --tracking-uri sqlite:////s/m.db "
                        "--work-dir /w --cache-dir /c --resume")
