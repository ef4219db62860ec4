"""What a plan will run, said before it runs: the `--dry-run` listing and a campaign's header.

A plan of up to `SUMMARY_ABOVE` trials is listed trial by trial; a larger one as a summary
(`verbose` lists every trial anyway): the values of each arm field, the seeds, the pipelines,
and the stage results the trials need. Shared stage results are content-addressed
(`stage_store.py`), so the summary counts the distinct ones per stage, how many the work dir's
store (or, for the teacher, the cache) already holds and how many will be trained, and the
optimiser steps ("stage-steps") that training adds up to — the campaign's cost, which the
number of trials alone does not say (Table 4's three arms share one stage 1 per seed).

    print(describe(plan, verbose=False, stage_root=Path("runs/stages"),
                   teacher_root=Path(".cache/teachers")))
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftok.train.stages import stage_identity, stage_key
from sftok.train.teacher_stage import teacher_cache_key, teacher_published
from sftok_experiments.expand import Plan, Trial, float_label, stage_steps
from sftok_experiments.stage_store import StageStore

SUMMARY_ABOVE = 50  # trials: a longer listing is a summary unless --verbose
_SHOWN = 3  # values shown at each end of a long list


@dataclass
class StageNeed:
    """One stage of a plan: distinct results needed, how many exist, steps still to train."""

    stage: str
    distinct: int = 0
    present: int = 0  # already in the stage store (teacher: in the cache)
    steps_to_train: int = 0
    steps_if_unshared: int = 0  # every trial training its own copy

    @property
    def to_train(self) -> int:
        return self.distinct - self.present


def stage_needs(plan: Plan, stage_root: Path | None, teacher_root: Path | None,
                share: bool = True) -> list[StageNeed]:
    """Per stage (stage0 = the teacher first), the results the plan's trials need.

    stage_root: the store of shared stage results (`<work dir>/stages`); teacher_root: the
    teacher cache (`<cache dir>/teachers`). share False (`--no-share-stages`): each trial
    trains its own copy of every stage. A `search:` plan counts its template once per sample
    (the sampled values decide what the samples could share, so none is assumed); generation
    stages train in the trial's own work dir, so once per trial.
    """
    store = StageStore(stage_root) if stage_root is not None and share else None
    repeat = plan.search["num_samples"] if plan.search else 1
    needs: dict[str, StageNeed] = {}
    seen: set[str] = set()  # stage-result and teacher keys counted already
    for t in plan.trials:
        cfg = t.config
        if cfg.teacher.source == "train":  # one teacher per distinct key, whatever the trials
            key = teacher_cache_key(cfg)
            n = needs.setdefault("stage0", StageNeed("stage0"))
            if key not in seen:
                seen.add(key)
                n.distinct += 1
                n.steps_if_unshared += cfg.train.teacher.steps
                if teacher_root is not None and teacher_published(teacher_root / key):
                    n.present += 1
                else:
                    n.steps_to_train += cfg.train.teacher.steps
        prev = None
        for stage in t.stages:
            steps = stage_steps(cfg, stage)
            n = needs.setdefault(stage, StageNeed(stage))
            n.steps_if_unshared += steps * repeat
            if stage == "generation" or not share or plan.search:
                n.distinct += repeat
                n.steps_to_train += steps * repeat
                continue
            prev = stage_key(stage_identity(cfg, stage, prev))
            if prev in seen:
                continue
            seen.add(prev)
            n.distinct += 1
            if store is not None and store.is_published(prev):
                n.present += 1
            else:
                n.steps_to_train += steps
    return list(needs.values())


def _value(v: Any) -> str:
    if isinstance(v, float):
        return float_label(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def _listing(items: list[str]) -> str:
    """'a, b, c' or, for a long list, its first and last few: 'a, b, c, …, x, y, z'."""
    if len(items) <= 2 * _SHOWN + 1:
        return ", ".join(items)
    return ", ".join(items[:_SHOWN]) + ", …, " + ", ".join(items[-_SHOWN:])


def _arms_lines(plan: Plan) -> list[str]:
    spec = plan.spec
    arms = len({t.arm for t in plan.trials})
    out = [f"arms: {arms:,}" + (" = " + " × ".join(
        [f"{len(spec.arms.named)} named"] * bool(spec.arms.named)
        + [f"{len(v)} {k.rsplit('.', 1)[-1]}" for k, v in spec.arms.grid.items()])
        if spec.arms.named or spec.arms.grid else "")]
    if spec.arms.named:
        out.append(f"  named ({len(spec.arms.named)}): "
                   + _listing([a.name for a in spec.arms.named]))
    width = max((len(k) for k in spec.arms.grid), default=0)
    for k, values in spec.arms.grid.items():
        out.append(f"  {k:<{width}}  {len(values):>5,} value(s): "
                   + _listing([_value(v) for v in values]))
    return out


def _needs_lines(needs: list[StageNeed], share: bool) -> list[str]:
    if not needs:
        return []
    out = ["stage results (distinct; already there; to train; optimiser steps to train):"]
    for n in needs:
        there = "cached" if n.stage == "stage0" else "reused" if share else "-"
        out.append(f"  {n.stage:<10} {n.distinct:>7,}   {n.present:>7,} {there:<6}  "
                   f"{n.to_train:>7,} to train  {n.steps_to_train:>12,} steps")
    total = sum(n.steps_to_train for n in needs)
    unshared = sum(n.steps_if_unshared for n in needs)
    out.append(f"  total: {total:,} stage-steps to train"
               + (f" ({unshared:,} if every trial trained its own stages)"
                  if unshared != total else ""))
    return out


def _trial_line(t: Trial, width: int) -> str:
    steps = " + ".join(f"{s}:{stage_steps(t.config, s)}" for s in t.stages)
    extra = ", ".join(f"{k}={_value(v)}" for k, v in t.arm_values.items()
                      if not k.endswith(".steps"))
    return (f"  {t.key:<{width}}  arm={t.arm} seed={t.seed} stages=[{steps}]"
            + (f"  ({extra})" if extra else ""))


def describe(plan: Plan, verbose: bool = False, stage_root: Path | None = None,
             teacher_root: Path | None = None, share: bool = True) -> str:
    """What `--dry-run` prints: header, every trial (or, above SUMMARY_ABOVE and without
    `verbose`, the summary), the stage results to train and reuse."""
    spec = plan.spec
    lines = [f"spec {spec.name} ({plan.spec_path}) — reproduces: {spec.reproduces or '-'}",
             f"preset {plan.preset}; {len(plan.trials)} trial(s); campaign {plan.campaign_hash}"]
    if plan.cli_overrides:
        lines.append("--set " + " ".join(f"{k}={v}" for k, v in plan.cli_overrides.items()))
    if plan.search:
        s = plan.search
        lines.append(f"search: Optuna, {s['num_samples']} samples, {s['mode']} {s['metric']} "
                     f"over {', '.join(s['space'])}")
    if verbose or len(plan.trials) <= SUMMARY_ABOVE:
        w = max(len(t.key) for t in plan.trials)
        lines += [_trial_line(t, w) for t in plan.trials]
    else:
        seeds = sorted({t.seed for t in plan.trials})
        pipelines = Counter(" → ".join(t.stages) for t in plan.trials)
        lines += _arms_lines(plan)
        lines.append(f"seeds: {len(seeds)} ({_listing([str(s) for s in seeds])})")
        lines += [f"pipeline: {p}  ({n:,} trial(s))" for p, n in pipelines.items()]
        lines.append(f"(each of the {len(plan.trials):,} trials: --dry-run --verbose)")
    lines += _needs_lines(stage_needs(plan, stage_root, teacher_root, share), share)
    if spec.report:
        lines.append(f"report: {spec.report}")
    return "\n".join(lines)


__all__ = ["SUMMARY_ABOVE", "StageNeed", "describe", "stage_needs"]
