"""The data-parallel scaling benchmark (`sftok.train.scaling`, `scripts/benchmark.py --scaling`):
its rows and refusals, not its speed (speed is measured, never asserted)."""
from __future__ import annotations

import pytest

from sftok.config import override
from sftok.presets import get_preset
from sftok.train.scaling import benchmark_scaling, format_scaling


def test_a_world_size_that_does_not_divide_the_accumulation_is_refused_before_spawning():
    cfg = override(get_preset("smoke"), {"train.stage1.grad_accum": 3})
    with pytest.raises(ValueError, match="2 workers cannot share stage1's grad_accum 3"):
        benchmark_scaling(cfg, "stage1", (1, 2), steps=1, warmup=0)


@pytest.mark.slow
def test_rows_at_one_and_two_workers_on_cpu():
    rows = benchmark_scaling(get_preset("smoke"), "stage1", (1, 2), steps=1, warmup=1)
    assert [r["workers"] for r in rows] == [1, 2]
    one, two = rows
    assert one["efficiency"] == pytest.approx(1.0)
    assert one["grad_accum"] == two["grad_accum"] == get_preset("smoke").train.stage1.grad_accum
    assert two["images_per_s_per_worker"] == pytest.approx(two["images_per_s"] / 2)
    assert two["efficiency"] == pytest.approx(two["images_per_s"] / (2 * one["images_per_s"]))
    assert all(r["images_per_s"] > 0 for r in rows)
    assert format_scaling(rows).count("\n") == 3  # header, rule, two rows
