"""A spec (+ CLI options) -> trials: arms x seeds, each with a resolved `ExperimentConfig`.

Resolution order of one trial's config (later wins):
  preset -> spec `overrides` -> spec `evaluation` -> named arm `overrides` -> grid values
  -> `--data` -> `--set` -> the arm's `stage_steps` budgets -> `seed`.
Relative file paths (data.path, data.val_path, teacher.weights) are made absolute against the
driver's working directory right after `--set`.
`stage_steps` is computed from the config just before it (so `--set train.stage1.steps=...`
also moves the budget of a "same total steps" arm).

Everything here is pure and fast: it runs (and fails, naming file and field) before Ray starts.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftok.config import ConfigError, ExperimentConfig, override, to_dict
from sftok.presets import PRESETS, get_preset
from sftok.run_record import BOUND_PREFIXES, bound_metric, eval_key, step_metric
from sftok_experiments.spec import STAGES, NamedArm, Spec, SpecError


@dataclass
class Trial:
    """One arm x seed (or, with `search:`, the template every Optuna sample starts from)."""

    key: str  # unique within the campaign, filesystem-safe: "<arm>_s<seed>"
    arm: str
    seed: int
    stages: list[str]
    config: ExperimentConfig
    arm_values: dict[str, Any] = field(default_factory=dict)  # the arm's own overrides
    # (key, arm) as the runner labelled this trial before arm labels printed floats as written
    # (`float_label`); None where the two agree. `Plan.with_legacy_labels` resumes old stores.
    legacy: tuple[str, str] | None = None

    def to_payload(self) -> dict[str, Any]:
        """JSON-safe form that travels to the Ray trial (no store paths inside)."""
        return {"key": self.key, "arm": self.arm, "seed": self.seed, "stages": list(self.stages),
                "config": to_dict(self.config), "arm_values": self.arm_values}


@dataclass
class Plan:
    spec: Spec
    spec_path: Path
    preset: str
    trials: list[Trial]
    search: dict[str, Any] | None = None  # the spec's search block (dumped) when present
    cli_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Trials the campaign runs: one per arm and seed, or the search's samples."""
        return self.search["num_samples"] if self.search else len(self.trials)

    @functools.cached_property
    def campaign_hash(self) -> str:
        """Identifies the campaign for `--resume`: same spec content, preset and trials.

        The sha256 of `json.dumps({"preset", "spec", "trials": [payloads]}, sort_keys=True)`,
        fed one trial at a time (the same bytes without the whole text of a 10,000-trial plan
        in memory). `max_trials` is left out: a confirmation threshold changes nothing a trial
        computes.
        """
        def dumps(v: Any) -> str:
            return json.dumps(v, sort_keys=True, default=str)

        h = hashlib.sha256()
        spec = self.spec.model_dump(mode="json", exclude={"max_trials"})
        h.update(f'{{"preset": {dumps(self.preset)}, "spec": {dumps(spec)}, "trials": ['
                 .encode())
        for i, t in enumerate(self.trials):
            h.update(((", " if i else "") + dumps(t.to_payload())).encode())
        h.update(b"]}")
        return h.hexdigest()[:16]

    def with_legacy_labels(self) -> Plan | None:
        """This plan with the arm labels of the older runner (floats by `repr`), whose stores
        hold campaigns under those labels; None if no label differs."""
        if not any(t.legacy for t in self.trials):
            return None
        trials = [dataclasses.replace(t, key=t.legacy[0], arm=t.legacy[1], legacy=None)
                  if t.legacy else t for t in self.trials]
        return dataclasses.replace(self, trials=trials)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` items -> {key: value}; values stay strings, which `override` parses as
    YAML scalars and checks against the field's type."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError("--set", item, "expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def parse_data(items: list[str] | None) -> dict[str, Any]:
    """`--data imagenet=PATH` (image folder or webdataset shards) / `--data embedded`.

    A folder path goes to `data.path` (an ImageNet root with train/ and val/ inside is enough,
    `sftok.data` finds both); `PATH` with `.tar` in it selects webdataset shards, optionally
    `TRAIN_PATTERN,VAL_PATTERN`.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if item == "embedded":
            out.update({"data.source": "embedded", "data.path": None, "data.val_path": None})
            continue
        if "=" not in item or not item.split("=", 1)[1]:
            raise SpecError("--data", item, "expected NAME=PATH (e.g. imagenet=/data/imagenet) "
                            "or 'embedded'")
        path = item.split("=", 1)[1]
        if ".tar" in path:
            train, _, val = path.partition(",")
            out.update({"data.source": "webdataset", "data.path": train,
                        "data.val_path": val or None})
        else:
            folder = Path(path).expanduser()
            if not folder.is_dir():  # refused now, not after the teacher trained on it
                raise SpecError("--data", item, f"{str(folder)!r} is not a directory; give an "
                                "image folder (an ImageNet root with train/ and val/, or "
                                "<root>/<class>/*.JPEG) or webdataset shards (a .tar pattern)")
            out.update({"data.source": "folder", "data.path": str(folder)})
    return out


# Config fields that name files: made absolute in the driver, because Ray runs each trial with
# its trial directory as the working directory (and maybe on another node).
PATH_FIELDS = ("data.path", "data.val_path", "teacher.weights", "generation.tokenizer",
               "generation.eval.reference_stats")


def absolute_paths(cfg: ExperimentConfig, cwd: str | Path | None = None) -> dict[str, str]:
    """{field: absolute path} for the relative (or ~) PATH_FIELDS of `cfg`; URLs / pipes kept."""
    out = {}
    for dotted in PATH_FIELDS:
        node: Any = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        if not node or "://" in node or node.startswith("pipe:"):
            continue
        p = Path(node).expanduser()
        if not p.is_absolute():
            p = Path(cwd or Path.cwd()) / p
        if str(p) != node:
            out[dotted] = os.path.normpath(p)
    return out


def float_label(v: float) -> str:
    """A float as a spec writes it: the shortest repr of its first 15 significant digits.

    Every decimal of up to 15 significant digits survives the trip through a double (DBL_DIG),
    so a value written `0.00003` or generated as `3 * 1e-5` (3.0000000000000004e-05) prints
    `3e-05`, and `1.0` stays `1.0`: the same text on every run and every machine.
    """
    return repr(float(f"{v:.15g}"))


def _label_value(v: Any, floats=float_label) -> str:
    if isinstance(v, float):
        return floats(v)
    if isinstance(v, (list, tuple)):
        return "x".join(_label_value(x, floats) for x in v)
    return str(v)


def _value_labels(values: list[Any]) -> list[str]:
    """Labels of one grid field's values; `repr` for the field if two values would share one."""
    labels = [_label_value(v) for v in values]
    exact = [_label_value(v, repr) for v in values]  # distinct for distinct values
    seen: dict[str, str] = {}
    if any(seen.setdefault(a, e) != e for a, e in zip(labels, exact)):
        return exact
    return labels


def _grid_labels(keys: list[str]) -> dict[str, str]:
    """Short names for grid fields: the last path component unless two fields share it."""
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {k: (s if counts[s] == 1 else k) for k, s in short.items()}


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", s)


def _apply(cfg: ExperimentConfig, overrides: dict[str, Any], file: Path, where: str
           ) -> ExperimentConfig:
    try:
        return override(cfg, overrides)
    except ConfigError as e:
        field = e.field
        # Name the spec field the override came from, plus the config path inside it.
        raise SpecError(file, f"{where}.{field}" if where else field,
                        str(e).split(": ", 1)[-1]) from None


def _stage_steps(cfg: ExperimentConfig, arm: NamedArm, file: Path, where: str
                 ) -> dict[str, int]:
    out = {}
    for stage, budget in arm.stage_steps.items():
        if isinstance(budget, int):
            steps = budget
        else:
            steps = sum(getattr(cfg.train, s).steps for s in budget)
        if steps < 1:
            raise SpecError(file, f"{where}.stage_steps.{stage}", "budget must be >= 1 step")
        out[f"train.{stage}.steps"] = steps
    return out


# S-dependent (`<name>_s<S>`) and S-independent metrics of sftok.evaluate, by `eval.metrics` entry.
_PER_S = ("psnr", "ssim", "lpips", "rfid", "is")
_S_FREE = {"tokens": ("token_top1", "token_ce", "codebook_usage", "codebook_entropy")}


def reported_metrics(cfg: ExperimentConfig) -> list[str]:
    """The eval/* metric names a trial with this config reports."""
    out = [eval_key(step_metric(n, s)) for n in _PER_S if n in cfg.eval.metrics
           for s in cfg.eval.decode_steps]
    # Floors and ceiling (sftok.evaluate.bounds): the same metrics, S-independent.
    out += [eval_key(bound_metric(b, n)) for b in BOUND_PREFIXES for n in _PER_S
            if n in cfg.eval.metrics]
    out.append(eval_key("num_images"))
    for n, names in _S_FREE.items():
        if n in cfg.eval.metrics:
            out += [eval_key(m) for m in names]
    return out


def _check_metric(metric: str, cfg: ExperimentConfig, spec_path: Path) -> None:
    known = reported_metrics(cfg)
    if metric not in known:
        raise SpecError(spec_path, "search.metric",
                        f"{metric} is not reported by this spec's evaluation (decode_steps "
                        f"{list(cfg.eval.decode_steps)}, metrics {list(cfg.eval.metrics)}); "
                        f"one of: {', '.join(known)}")


def expand(spec: Spec, spec_path: Path, *, preset: str | None = None, seeds: int | None = None,
           sets: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> Plan:
    """All trials of a spec; raises SpecError (file + field) on any bad override."""
    preset = preset or spec.preset
    if preset not in PRESETS:
        where = "--preset" if preset != spec.preset else "preset"
        raise SpecError(spec_path if where == "preset" else "--preset", where,
                        f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    sets = dict(sets or {})
    data = dict(data or {})
    if seeds is not None and seeds < 1:  # 0 is not "the spec's seeds", -1 not a traceback
        raise SpecError("--seeds", "", f"must be >= 1, got {seeds}")
    seed_list = list(range(seeds)) if seeds is not None else spec.seed_list()

    base = get_preset(preset)
    base = _apply(base, spec.overrides, spec_path, "overrides")
    base = _apply(base, spec.evaluation.overrides(), spec_path, "evaluation")

    named: list[NamedArm | None] = list(spec.arms.named) or [None]
    grid_keys = list(spec.arms.grid)
    labels = _grid_labels(grid_keys)
    grid_values = [spec.arms.grid[k] for k in grid_keys]
    value_labels = [_value_labels(v) for v in grid_values]
    legacy_labels = [[_label_value(x, repr) for x in v] for v in grid_values]
    combos = list(itertools.product(*(range(len(v)) for v in grid_values)))

    if spec.search is not None and (spec.arms.named or spec.arms.grid):
        raise SpecError(spec_path, "search", "a search spec has no arms (the searcher picks "
                        "the values); move fixed choices to `overrides`")

    # An arm variable overridden from the command line would make the arms identical while
    # their labels still claim different values: refuse it.
    arm_keys = {k: "arms.grid" for k in grid_keys}
    for i, arm in enumerate(spec.arms.named):
        for k in arm.overrides:
            arm_keys.setdefault(k, f"arms.named[{i}].overrides")
    for src, given in (("--data", data), ("--set", sets)):
        for k in given:
            if k in arm_keys:
                raise SpecError(src, k, f"is an arm variable of this spec ({arm_keys[k]}); "
                                "overriding it would make the arms identical")

    trials: list[Trial] = []
    for i, arm in enumerate(named):
        where_arm = f"arms.named[{i}]"
        base_arm = _apply(base, arm.overrides, spec_path, f"{where_arm}.overrides") \
            if arm is not None else base
        for combo in combos:
            cfg = base_arm
            arm_values: dict[str, Any] = dict(arm.overrides) if arm is not None else {}
            parts = [arm.name] if arm is not None else []
            old_parts = list(parts)
            grid_over = {k: grid_values[j][c] for j, (k, c) in enumerate(zip(grid_keys, combo))}
            if grid_over:
                cfg = _apply(cfg, grid_over, spec_path, "arms.grid")
                arm_values.update(grid_over)
                parts += [f"{labels[k]}={value_labels[j][c]}"
                          for j, (k, c) in enumerate(zip(grid_keys, combo))]
                old_parts += [f"{labels[k]}={legacy_labels[j][c]}"
                              for j, (k, c) in enumerate(zip(grid_keys, combo))]
            cfg = _apply(cfg, data, "--data", "") if data else cfg
            cfg = _apply(cfg, sets, "--set", "") if sets else cfg
            abs_paths = absolute_paths(cfg)
            cfg = _apply(cfg, abs_paths, "--set", "") if abs_paths else cfg
            if arm is not None and arm.stage_steps:
                steps = _stage_steps(cfg, arm, spec_path, where_arm)
                cfg = _apply(cfg, steps, spec_path, f"{where_arm}.stage_steps")
                arm_values.update(steps)
            stages = list(arm.stages) if arm is not None and arm.stages else list(spec.stages)
            label = ",".join(parts) or ("search" if spec.search else "base")
            old_label = ",".join(old_parts) or label
            for seed in (seed_list[:1] if spec.search else seed_list):
                tcfg = _apply(cfg, {"seed": seed}, spec_path, "seeds")
                legacy = ((_safe(f"{old_label}_s{seed}"), old_label) if old_label != label
                          else None)
                trials.append(Trial(key=_safe(f"{label}_s{seed}"), arm=label, seed=seed,
                                    stages=stages, config=tcfg, arm_values=dict(arm_values),
                                    legacy=legacy))

    keys = [t.key for t in trials]
    if len(set(keys)) != len(keys):
        raise SpecError(spec_path, "arms", "two arms produce the same label")

    search = None
    if spec.search is not None:
        # Check each dimension is a real config field and that every value the searcher can
        # pick (each choice, both bounds) passes the field's type / range checks.
        for k, dist in spec.search.space.items():
            for sample in dist.extremes():
                _apply(trials[0].config, {k: sample}, spec_path, "search.space")
        _check_metric(spec.search.metric, trials[0].config, spec_path)
        search = spec.search.model_dump(mode="json")
    for t in trials:
        for s in t.stages:
            assert s in STAGES
        _check_generation_source(t, spec_path)
    return Plan(spec=spec, spec_path=spec_path, preset=preset, trials=trials, search=search,
                cli_overrides=sets)


def _check_generation_source(t: Trial, file: Path) -> None:
    """A generation stage needs exactly one tokenizer: trained in the trial or a checkpoint."""
    if "generation" not in t.stages:
        return
    own = [s for s in t.stages if s != "generation"]
    path = t.config.generation.tokenizer
    if not own and not path:
        raise SpecError(file, "stages", f"trial {t.key}: the generation stage needs a tokenizer: "
                        "add tokenizer stages before it (e.g. [stage1, stage2, generation]) or "
                        "set generation.tokenizer to a checkpoint directory")
    if own and path:
        raise SpecError(file, "generation.tokenizer", f"trial {t.key}: set both to a checkpoint "
                        f"({path}) and trains its own tokenizer ({', '.join(own)}); keep one")


def stage_steps(cfg: ExperimentConfig, stage: str) -> int:
    """Optimiser steps of one pipeline stage of `cfg`."""
    if stage == "generation":
        return cfg.generation.train.steps
    return getattr(cfg.train, stage).steps
