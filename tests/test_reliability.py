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
