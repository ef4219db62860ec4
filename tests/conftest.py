"""Shared test fixtures. Tests run on CPU; heavier tests are marked `slow` (deselected by default)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Two cores on CI: intra-op parallelism beyond that only adds contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
    """An MlflowClient on `store` (the test module has put experiments/ on sys.path)."""
    from sftok_experiments.tracking import client_for, resolve_store

    return client_for(resolve_store(str(store))[0])


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of 2 CPUs for a campaign test module (shut down after it, if it started it)."""
    import ray
    from sftok_experiments.campaign import init_ray

    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()
