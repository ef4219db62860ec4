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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

from sftok_experiments import cli  # noqa: E402
from sftok_experiments.spec import SpecError  # noqa: E402

from sftok.train import NonFiniteLossError  # noqa: E402


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
    from sftok_experiments.trial import _survives_ray, one_line

    class Fussy(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    assert not _survives_ray(Fussy(1, 2)) and _survives_ray(ValueError("x"))
    assert one_line(ValueError("two\nlines")) == "ValueError: two lines"


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
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / 'experiments')!r})
        from sftok_experiments import tracking as trk
        import mlflow  # imported before the start line, so both start together
        uri, art = trk.resolve_store(sys.argv[1])
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        client = trk.client_for(uri)
        exp = trk.get_experiment(client, "shared", art, {{}})
        print("exp", exp, client.get_experiment(exp).tags[trk.EXPERIMENT_KIND_TAG])
    """))
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    start = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, str(script), uri, start], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [o.strip().splitlines()[-1] for o in outs]
    assert lines[0] == lines[1] and lines[0].endswith(" custom_model_development")
