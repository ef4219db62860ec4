"""What an invocation tells the console when it ends: its result, and the summary table.

    summary: 3 trial(s), wall 38s, parent run 3cd6...
    stage results: 4 trained (12 steps), 2 reused (6 steps)
    arm                seed  status    psnr_s8  ssim_s8  token_top1  time
    replace_ratio=0.5  0     FINISHED  9.2321   0.0193   0.0417      13s
    ...
    floor_tokenizer  psnr 19.3711  ssim 0.3960
    teacher          psnr 9.3409  ssim 0.0103

The table shows, per trial, the key metrics at the largest decode-step count evaluated
(`summary_metric_keys`), then the floors and the ceiling (`bounds_lines`); a trial's
"finished" line shows the same metrics (`short_metrics`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sftok.run_record import (
    BOUND_PREFIXES,
    bound_metric,
    eval_key,
    eval_name,
    parse_step_metric,
    step_metric,
)

KEY_METRICS = ("psnr", "ssim", "lpips", "rfid")  # shown at the largest S evaluated
GENERATION_SUMMARY = ("gfid", "is", "calib_fid_recon", "sample_codebook_usage")


@dataclass
class TrialSummary:
    key: str
    arm: str
    seed: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)  # the run's eval/* metrics
    error: str | None = None
    seconds: float = 0.0
    run_id: str | None = None
    note: str = ""
    stage_sources: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # undecodable files: train / val


@dataclass
class CampaignResult:
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    campaign_dir: Path
    trials: list[TrialSummary]
    wall_s: float
    interrupted: bool = False
    setup_error: str | None = None  # e.g. the teacher could not be trained / loaded
    usage_error: str | None = None  # nothing ran: e.g. --resume found no campaign to continue

    def stage_count(self, source: str, steps: bool = False) -> int:
        """Stage results this invocation's trials trained / reused (or their steps)."""
        return sum(n if steps else 1 for t in self.trials
                   for src, _key, n in t.stage_sources.values() if src == source)

    @property
    def ok(self) -> bool:
        return (not self.interrupted and self.setup_error is None and self.usage_error is None
                and all(t.status == "FINISHED" for t in self.trials))

    @property
    def exit_code(self) -> int:
        """0 all finished, 1 a failure, 2 a usage error, 130 interrupted (the shell's Ctrl-C)."""
        if self.usage_error:
            return 2
        return 0 if self.ok else 130 if self.interrupted and not self.setup_error else 1


def clock() -> str:
    """The time stamp of an event line."""
    return time.strftime("%H:%M:%S")


def summary_metric_keys(all_metrics: list[dict[str, float]]) -> list[str]:
    """eval/<m>_s<S> at the largest S present for the key metrics, then token_top1."""
    present = set().union(*[set(m) for m in all_metrics]) if all_metrics else set()
    steps: dict[str, list[int]] = {}
    for key in present:
        parsed = parse_step_metric(eval_name(key) or "")
        if parsed:
            steps.setdefault(parsed[0], []).append(parsed[1])
    out = [eval_key(step_metric(m, max(steps[m]))) for m in KEY_METRICS if m in steps]
    out += [k for k in (eval_key("token_top1"),) if k in present]
    # Generation trials (Table 2) report S-independent names.
    out += [k for k in map(eval_key, GENERATION_SUMMARY) if k in present]
    return out


def comparison_metric_keys(all_metrics: list[dict[str, float]]) -> list[str]:
    """The metric columns of the MLflow UI's comparison view (`run_record.comparison_view`):
    the summary table's, then the floors' and the ceiling's of the same metrics, those present
    (rFID only where the trials could compute it)."""
    present = set().union(*[set(m) for m in all_metrics]) if all_metrics else set()
    bounds = [eval_key(bound_metric(prefix, m)) for prefix in BOUND_PREFIXES
              for m in KEY_METRICS]
    return summary_metric_keys(all_metrics) + [k for k in bounds if k in present]


def short_metrics(metrics: dict[str, float]) -> str:
    """`psnr_s8=9.232  ssim_s8=0.01932 ...`: a finished trial's key metrics on one line."""
    keys = summary_metric_keys([metrics])
    return "  ".join(f"{eval_name(k)}={metrics[k]:.4g}" for k in keys if k in metrics)


def bounds_lines(all_metrics: list[dict[str, float]]) -> list[str]:
    """'floor/ceiling' lines for the summary: the naive-codec floors and the teacher ceiling
    (sftok.evaluate.bounds), identical for trials sharing data and teacher (first one shown)."""
    out = []
    for prefix in BOUND_PREFIXES:
        head = eval_key(bound_metric(prefix, ""))
        values = next((m for m in all_metrics if any(k.startswith(head) for k in m)), None)
        if values is None:
            continue
        cells = [f"{k.removeprefix(head)} {v:.4f}" for k, v in sorted(values.items())
                 if k.startswith(head)]
        out.append(f"{prefix:<16} " + "  ".join(cells))
    return ([""] + out) if out else []


def max_skipped(trials: list[TrialSummary]) -> dict[str, int]:
    """'train' / 'val' -> the most undecodable files one trial met (0 without trials)."""
    return {k: max((t.skipped.get(k, 0) for t in trials), default=0) for k in ("train", "val")}


def skipped_line(trials: list[TrialSummary]) -> str | None:
    """One line on undecodable image files met by the trials (None when there were none)."""
    train, val = max_skipped(trials).values()
    if not train and not val:
        return None
    return (f"data: undecodable image files skipped — training: up to {train} per trial "
            f"(replaced by the next decodable file), validation: {val} per trial (left out, "
            f"not scored); metrics train/<stage>/data_skipped, eval/skipped_images")


def summary_table(result: CampaignResult) -> str:
    """The final table: arm, seed, status, key eval metrics (largest S), time."""
    keys = summary_metric_keys([t.metrics for t in result.trials])
    head = ["arm", "seed", "status"] + [eval_name(k) for k in keys] + ["time"]
    rows = []
    for t in result.trials:
        status = t.status + (f" ({t.note})" if t.note else "")
        rows.append([t.arm, str(t.seed), status]
                    + [f"{t.metrics[k]:.4f}" if k in t.metrics else "-" for k in keys]
                    + [f"{t.seconds:.0f}s" if t.seconds else "-"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    title = (f"summary: {len(result.trials)} trial(s), wall {result.wall_s:.0f}s, parent run "
             f"{result.parent_run_id}")
    stages = (f"stage results: {result.stage_count('trained')} trained "
              f"({result.stage_count('trained', steps=True)} steps), "
              f"{result.stage_count('reused')} reused "
              f"({result.stage_count('reused', steps=True)} steps)")
    out = [title, stages, line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += bounds_lines([t.metrics for t in result.trials])
    skipped = skipped_line(result.trials)
    return "\n".join(out + ([skipped] if skipped else []))
