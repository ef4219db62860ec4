"""Per-trial progress in the driver's console: step, loss, images/s and ETA of the running stage.

Trials report every `log_every` optimiser steps (`trial.report_train`); the tracker feeds those
reports here, and a line is printed per trial at most every `every` seconds (and not at all
when `every` < 0), so a long stage no longer looks frozen and many trials do not flood the
console:

    [12:01:30] trial replace_ratio=0.5_s0     stage2 120/400 (30%)  loss 3.214  41.2 img/s  ETA 2m10s
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class StageProgress:
    """The progress of one trial through its stage pipeline (one per trial)."""

    stages: list[str]  # the trial's pipeline, in order
    steps: dict[str, int]  # stage -> its optimiser steps
    every: float = 30.0  # seconds between two lines of this trial; < 0: never
    _last_line: float = field(default=float("-inf"))
    _start: dict[str, tuple[float, int]] = field(default_factory=dict)  # stage -> (t, step)

    def offset(self, stage: str) -> int:
        """Global step at which `stage` starts (stage steps are counted on from the earlier
        stages, see `train_stage(step_offset=...)`)."""
        return sum(self.steps[s] for s in self.stages[: self.stages.index(stage)])

    def update(self, stage: str, global_step: int, metrics: dict[str, float],
               now: float | None = None) -> str | None:
        """Record one train report; the text of a progress line when one is due, else None."""
        now = time.time() if now is None else now
        if stage not in self.steps or stage not in self.stages:
            return None
        step = global_step - self.offset(stage)
        first = self._start.setdefault(stage, (now, step))  # this attempt's first report
        if self.every < 0 or now - self._last_line < self.every:
            return None
        self._last_line = now
        total = self.steps[stage]
        parts = [f"{stage} {step}/{total} ({100 * step // max(total, 1)}%)"]
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4g}")
        if "images_per_s" in metrics:
            parts.append(f"{metrics['images_per_s']:.1f} img/s")
        elapsed, done = now - first[0], step - first[1]
        if done > 0 and elapsed > 0 and step < total:
            parts.append(f"ETA {_duration((total - step) * elapsed / done)}")
        return "  ".join(parts)
