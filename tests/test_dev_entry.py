"""dev.py's main job: which command `python dev.py run [...]` runs (no environment is built)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def dev(monkeypatch):
    spec = importlib.util.spec_from_file_location("dev_entry", ROOT / "dev.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls: list[list[str]] = []
    monkeypatch.setattr(mod, "ensure_env", lambda: Path(sys.executable))
    monkeypatch.setattr(mod.subprocess, "run",
                        lambda args, **kw: calls.append(args) or subprocess.CompletedProcess(args, 0))
    mod.calls = calls
    return mod


@pytest.mark.parametrize("argv, expected", [
    # The main job: the default spec at its own 3 seeds (15 minutes on 2 cores); options alone
    # apply to it.
    (["run"], ["ablation_replace_ratio"]),
    (["run", "--resume"], ["ablation_replace_ratio", "--resume"]),
    # An explicit seed count wins, in either spelling; a named spec keeps its own default.
    (["run", "--seeds", "3"], ["ablation_replace_ratio", "--seeds", "3"]),
    (["run", "--seeds=1"], ["ablation_replace_ratio", "--seeds=1"]),
    (["run", "step_sweep"], ["step_sweep"]),
    (["run", "--list"], ["--list"]),
])
def test_run_arguments(dev, argv, expected):
    assert dev.main(argv) == 0
    (args,) = dev.calls
    assert args[1] == str(ROOT / "experiments" / "run.py")
    assert args[2:] == expected
