"""Shared test fixtures. Tests run on CPU; heavier tests are marked `slow` (deselected by default)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from storage_helpers import mounted_tmpfs

FIXTURES = Path(__file__).parent / "fixtures"

# Two cores on CI: intra-op parallelism beyond that only adds contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    """The processes tests start (scripts, experiments/run.py) import what the tests import:
    the `pythonpath` of pyproject.toml (experiments/, analysis/, tests/)."""
    paths = [str(p) for p in config.getini("pythonpath")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


@dataclass
class TrainedTeacher:
    teacher: Any  # FrozenTeacher
    cache: Path  # the teachers' cache holding it: get_teacher(smoke config, cache) finds it
    reports: list  # (step, metrics) the stage-0 callback received while it trained


@pytest.fixture(scope="session")
def smoke_teacher_run(tmp_path_factory) -> TrainedTeacher:
    """The `smoke` preset's teacher, trained once per session (stage 0)."""
    from sftok.presets import get_preset
    from sftok.train import get_teacher

    cache = tmp_path_factory.mktemp("smoke-teachers")
    reports: list = []
    teacher = get_teacher(get_preset("smoke"), cache,
                          callback=lambda step, m: reports.append((step, m)))
    return TrainedTeacher(teacher, cache, reports)


@pytest.fixture(scope="session")
def smoke_teacher(smoke_teacher_run):
    return smoke_teacher_run.teacher


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    """Inputs and expected outputs of the reference implementation (tests/fixtures/GOLDEN_README.md)."""
    from safetensors.torch import load_file

    return load_file(FIXTURES / "tensors.safetensors")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A module's MLflow store directory (campaign tests: one SQLite schema per module)."""
    return tmp_path_factory.mktemp("mlruns")


@pytest.fixture(scope="module")
def client(store):
    """An MlflowClient on `store`."""
    from sftok_experiments.tracking import open_store

    return open_store(str(store))[0]


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of 2 CPUs for a campaign test module (shut down after it, if it started it)."""
    import ray
    from sftok_experiments.campaign import init_ray

    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write: mode 0555 for a normal user; root ignores modes, so a
    read-only tmpfs there (skipped where none can be mounted)."""
    d = tmp_path / "read-only"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    with mounted_tmpfs(d, "1m", read_only=True):
        yield d
