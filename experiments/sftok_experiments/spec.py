"""Experiment specs: `experiments/specs/<name>.yaml`, validated strictly (DESIGN §2).

A spec is data: what it reproduces, the base preset, the stage pipeline, the arms (a grid over
any dotted config field and/or named arms with their own overrides and pipeline), the seeds,
the evaluation, the analysis notebook it feeds and an optional Optuna `search:` block.

    name: ablation_replace_ratio
    reproduces: Table 4
    preset: tiny
    stages: [stage1, stage2]
    arms:
      grid:
        train.stage2.replace_ratio: [0.5, 0.8, 1.0]
    seeds: 3
    evaluation: {decode_steps: [8]}
    report: analysis/table4_replace_ratio.py
    max_trials: 100          # optional: more trials than this need --yes (default 100)

Every model is `extra='forbid'` and strict: an unknown key, a wrong type or an unknown stage
raises `SpecError` naming the file and the field (e.g. `ablation.yaml: arms.grid: ...`).
Config paths inside overrides / grid / search are checked against `ExperimentConfig` when the
spec is expanded (`expand.py`), also before any compute.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sftok import config, run_record
from sftok_experiments import SPECS_DIR

TokenizerStage = Literal["stage1", "stage2", "stage3"]
# `generation` (Table 2) trains a class-conditional generator on the tokens of the tokenizer the
# earlier stages produced, or of `generation.tokenizer` when it is the only stage.
Stage = Literal["stage1", "stage2", "stage3", "generation"]
STAGES: tuple[str, ...] = ("stage1", "stage2", "stage3", "generation")
EVAL_METRICS = Literal[config.EVAL_METRICS]
DEFAULT_MAX_TRIALS = 100  # `Spec.max_trials` when a spec does not set it
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


class SpecError(ValueError):
    """A bad spec: `file` and dotted `field` name the offending place."""

    def __init__(self, file: str | Path, field: str, message: str):
        self.file = str(file)
        self.field = field
        self.message = message
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")

    def __reduce__(self):  # survives pickling, like ConfigError
        return (type(self), (self.file, self.field, self.message))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NamedArm(_Strict):
    """An arm with its own overrides and, optionally, its own stage pipeline (Table 3)."""

    name: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    stages: list[Stage] | None = None  # None: the spec's pipeline
    # Step budgets relative to the preset: {stage2: [stage1, stage2]} gives this arm's stage 2
    # the preset's stage-1 + stage-2 steps ("same total budget", Table 3); an int is absolute.
    stage_steps: dict[TokenizerStage, int | list[TokenizerStage]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("letters, digits and _ . = + - only, starting with a letter or digit")
        return v


class Arms(_Strict):
    """Arms = named arms x grid (cartesian product over every grid field); either may be empty."""

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    named: list[NamedArm] = Field(default_factory=list)

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, values in v.items():
            if not values:
                raise ValueError(f"{k}: needs at least one value")
        return v

    @field_validator("named")
    @classmethod
    def _unique(cls, v: list[NamedArm]) -> list[NamedArm]:
        names = [a.name for a in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate arm names {sorted(dup)}")
        return v


class Evaluation(_Strict):
    """Evaluation settings; anything left out keeps the preset's value (`eval.*` config)."""

    decode_steps: list[Annotated[int, Field(ge=1)]] | None = None
    trace_steps: Annotated[int, Field(ge=1)] | None = None
    metrics: list[EVAL_METRICS] | None = None
    max_images: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    grid_images: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None

    def overrides(self) -> dict[str, Any]:
        return {f"eval.{k}": v for k, v in self.model_dump().items() if v is not None}


class Dist(_Strict):
    """One search dimension: exactly one of the keys."""

    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    loguniform: Annotated[list[Annotated[float, Field(gt=0)]],
                          Field(min_length=2, max_length=2)] | None = None
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None  # [low, high)
    choice: list[Any] | None = None

    def kind(self) -> tuple[str, Any]:
        set_ = [(k, v) for k, v in self.model_dump().items() if v is not None]
        if len(set_) != 1:
            raise ValueError("give exactly one of uniform, loguniform, randint, choice")
        return set_[0]

    def check(self) -> None:
        """Ranges the samplers accept: Ray/Optuna would only fail once the campaign started."""
        kind, v = self.kind()
        if kind == "choice" and not v:
            raise ValueError("choice: needs at least one value")
        if kind != "choice" and not v[0] < v[1]:
            raise ValueError(f"{kind}: low must be < high, got {v}")

    def extremes(self) -> list[Any]:
        """The values to try through the config before compute: every choice / both bounds."""
        kind, v = self.kind()
        if kind == "choice":
            return list(v)
        return [v[0], v[1] - 1] if kind == "randint" else list(v)  # randint's high is excluded


class Search(_Strict):
    """Optuna search through Ray Tune's OptunaSearch; each sample is one trial / child run."""

    space: dict[str, Dist]
    metric: str  # an eval metric the spec's evaluation reports, e.g. eval/psnr_s8 (expand.py)
    mode: Literal["min", "max"]
    num_samples: Annotated[int, Field(ge=1)]

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, Dist]) -> dict[str, Dist]:
        if not v:
            raise ValueError("needs at least one dimension")
        for k, d in v.items():
            try:
                d.check()
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        # Only the final report (eval/*) reaches the searcher (campaign.FinalMetricOptuna).
        if run_record.eval_name(v) is None:
            raise ValueError("must be a reported eval metric name, e.g. eval/psnr_s8")
        return v


class Spec(_Strict):
    name: str
    reproduces: str = ""
    description: str = ""
    preset: str = "tiny"
    stages: list[Stage] = Field(default_factory=lambda: ["stage1", "stage2"])
    overrides: dict[str, Any] = Field(default_factory=dict)  # applied to every arm
    arms: Arms = Field(default_factory=Arms)
    seeds: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=0)]] = 1
    evaluation: Evaluation = Field(default_factory=Evaluation)
    report: str | None = None  # the analysis notebook this spec feeds
    search: Search | None = None
    max_failures: Annotated[int, Field(ge=0)] = 1  # retries of a crashed trial
    # A campaign of more trials than this asks for --yes before any compute (a grid typo can
    # mean 10,000 trials); a spec meant to be that large says so here. Not part of the
    # campaign's identity (`Plan.campaign_hash`).
    max_trials: Annotated[int, Field(ge=1)] = DEFAULT_MAX_TRIALS

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("letters, digits and _ . = + - only")
        return v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        return _check_pipeline(v)

    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


def _check_pipeline(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("needs at least one stage (stage0, the teacher, runs once per campaign)")
    if len(set(v)) != len(v):
        raise ValueError("a stage appears twice")
    if list(v) != sorted(v, key=STAGES.index):
        raise ValueError("stages must be in order (stage1 < stage2 < stage3 < generation)")
    return v


_UNION_MARKER = re.compile(r"^(constrained-)?(int|float|str|bool|list|dict|tuple)$|\[|^function-"
                           r"|^literal|^tagged-union|^nullable")


def _loc(loc: tuple) -> str:
    """pydantic's error location -> a dotted field path (union-branch markers dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_MARKER.search(str(part)) and not out.endswith(("grid", "space",
                                                                    "overrides")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_spec(data: Any, file: str | Path) -> Spec:
    """Validate a parsed YAML document; SpecError names the file and the first bad field."""
    if not isinstance(data, dict):
        raise SpecError(file, "", f"a spec is a mapping, got {type(data).__name__}")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        # Unions report one error per branch; keep one line per field.
        seen, lines = set(), []
        for err in errs:
            field = _loc(tuple(err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            if field in seen:
                continue
            seen.add(field)
            lines.append((field, msg))
        field, msg = lines[0]
        more = "".join(f"\n  {f}: {m}" for f, m in lines[1:])
        raise SpecError(file, field, msg + more) from None
    for i, arm in enumerate(spec.arms.named):
        if arm.stages is not None:
            try:
                _check_pipeline(arm.stages)
            except ValueError as e:
                raise SpecError(file, f"arms.named[{i}].stages", str(e)) from None
        pipeline = arm.stages or spec.stages
        for stage in arm.stage_steps:  # a budget for a stage the arm never runs is a typo
            if stage not in pipeline:
                raise SpecError(file, f"arms.named[{i}].stage_steps.{stage}",
                                f"not a stage of this arm (stages {list(pipeline)})")
    return spec


def resolve_spec_path(name_or_path: str) -> Path:
    """A spec name (`ablation_replace_ratio`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise SpecError(p, "", "no such file")
        if not p.is_file():
            raise SpecError(p, "", "is a directory, not a spec; give a YAML file or a spec name "
                                   f"({', '.join(list_specs())})")
        return p
    cand = SPECS_DIR / f"{name_or_path}.yaml"
    if not cand.exists():
        known = ", ".join(list_specs())
        raise SpecError(cand, "", f"unknown spec {name_or_path!r} (known: {known})")
    return cand


def load_spec(name_or_path: str) -> tuple[Spec, Path]:
    path = resolve_spec_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(path, "", f"not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(path, "", f"cannot be read ({e.__class__.__name__}: {e})") from None
    return parse_spec(data, path), path


def list_specs() -> list[str]:
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))
