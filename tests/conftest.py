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
