"""The MLflow run record: every name a campaign writes into the store and a notebook reads back.

Plain names and functions (no MLflow, no Ray import): the runner (`experiments/`), its tracker,
`python -m sftok.evaluate`, the analysis notebooks (`analysis/mlflow_data.py`) and the tests all
take the record's layout from here, so the writer and the readers cannot disagree. To rename a
metric, a tag or an artifact, change it here (and `tests/fixtures/run_record.json`, which pins
what the runner writes).

Store: a directory `DIR` is the SQLite database `DIR/mlflow.db` plus artifacts under
`DIR/artifacts/<experiment>/`; a URI (`sqlite:///…`, `http://…`, `file:…`, `databricks`) is used
as given. Default: `$MLFLOW_TRACKING_URI`, else `mlruns/` of the checkout (`store_location`).

Experiment: one per spec, named after it; tags `spec`, `reproduces`, `mlflow.experimentKind`,
and per campaign `mlflow.sharedViewState.<parent run id>`: the MLflow UI's view comparing its
arms (`comparison_view`, opened by `comparison_address`; `python experiments/run.py ui`).

Parent run: one per invocation of `experiments/run.py` (`parent_tags`): `sftok.role=parent`,
`spec`, `preset`, `git_commit`, `git_dirty`, `command`, `sftok.campaign` (hash of spec content,
preset and trials: what `--resume` matches), `sftok.campaign_dir`, `reproduces`, `report`,
`spec_file`, `n_trials`[, `overrides`]; on resume `resumed` = n and `command.resume<n>`;
`teacher.<i>` = the stage-0 teacher's cache key; when it ends `n_finished`, `n_failed`,
`wall_s`, `data_skipped.train` / `.val`[, `interrupted`][, `error`]. Metrics: stage 0
`train/stage0/<name>` (step = optimiser step) and `campaign/stages_trained`, `…_reused`,
`campaign/stage_steps_trained`, `…_reused` (step = resume count). Artifacts: the spec file,
`plan.json`, `summary.txt`, `teacher/<key>.json`, and a notebook's outputs under
`analysis/<notebook>/`.

Child run: one per trial (`trial_tags`): `mlflow.parentRunId`, `sftok.role=trial`, `arm`,
`seed`, `trial_key` (`<arm>_s<seed>`, or `search-<ray trial id>` for an Optuna sample), `spec`,
`preset`, `ray_trial_id`, `stages`, `arm.<field>` / `search.<field>` (the arm's or the sample's
values); `stage.<stage>.source` (trained / reused) and `stage.<stage>.key`; `placement.*`
(`sftok_experiments/placement.py`: `placement.workers` = W, the node / device of the process
that trained, and with W > 1 `placement.rank<r>.*` of every rank); `eval_unavailable.<metric>`
(why a metric is missing);
`error`, `artifact_error`, `resumed`. Params: the flattened resolved config plus `stages` and
`arm` (`param_str`; read back with `coerce_param`). Metrics: `train/<stage>/<name>` (step =
global optimiser step), `eval/<name>` (step 0) and `trace/<name>` (step = decode step i, 1..S).

Evaluation metric names (the evaluator's flat names, `eval/` prefixed in the record): per decode
step count S `<metric>_s<S>` (`step_metric`), S-independent `<metric>`; the floors and the
ceiling of `sftok/evaluate/bounds.py` `<prefix>_<metric>` (`bound_metric`, prefixes
`floor_tokenizer`, `floor_teacher`, `teacher`); with every trace the revealed-token
information `reveal_<kind>_r<100·r>` (`reveal_metric`, kinds `REVEAL_KINDS`); a guidance sweep point
`sweep/<schedule>/s<scale>/tau<temperature>/<metric>` (`sweep_metric`).

Artifacts of a child run (`write_trial_artifacts`): `config.json` {config, stages, arm, seed,
arm_values}, `eval.json` {metrics, unavailable}, `trace.csv` (one row per decode step),
`grids/recon_s<S>.png`, `checkpoint/` (the model directory); a generation trial adds
`generation.json`, `sweep.csv`, `grids/samples.png` and `grids/samples_class<c>.png`; a failed
trial `error.txt`. `python -m sftok.evaluate --out DIR` writes the same files (`config.json`
without the trial fields).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------

# The checkout (sftok is installed editable from it, `dev.py`): its mlruns/ is the default store.
DEFAULT_STORE = Path(__file__).resolve().parent.parent / "mlruns"
DB_FILE = "mlflow.db"
ARTIFACTS = "artifacts"


@dataclass(frozen=True)
class Store:
    uri: str  # the tracking URI
    artifact_root: str | None  # file URI of DIR/artifacts; None: the server's default
    directory: Path | None  # DIR holding mlflow.db and artifacts/ (None: not a local store)


def store_location(tracking: str | os.PathLike | None = None) -> Store:
    """Where a store is, as `--tracking-uri` reads it (module docstring). Creates nothing."""
    if tracking is None or str(tracking) == "":
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or str(DEFAULT_STORE)
    tracking = str(tracking)
    if "://" in tracking or tracking.startswith(("sqlite:", "databricks")):
        if tracking.startswith("sqlite:///"):
            directory = Path(tracking.removeprefix("sqlite:///")).parent
            return Store(tracking, (directory / ARTIFACTS).resolve().as_uri(), directory)
        return Store(tracking, None, None)
    directory = Path(tracking).expanduser().resolve()
    return Store(f"sqlite:///{directory / DB_FILE}", (directory / ARTIFACTS).as_uri(), directory)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores or in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


# --------------------------------------------------------------------------------------------
# Experiments, roles, searches
# --------------------------------------------------------------------------------------------

SPEC_TAG = "spec"
REPRODUCES_TAG = "reproduces"
# MLflow 3's UI opens an experiment in the view its kind names; without the tag it shows the
# GenAI (traces) overview, where training runs, their metrics and charts are not listed.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

ROLE_TAG = "sftok.role"
PARENT_ROLE, TRIAL_ROLE = "parent", "trial"
PARENT_ID_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests children under it
CAMPAIGN_TAG = "sftok.campaign"
CAMPAIGN_DIR_TAG = "sftok.campaign_dir"
KEY_TAG = "trial_key"


def experiment_name(spec: str) -> str:
    return spec


def experiment_tags(spec: str, reproduces: str) -> dict[str, str]:
    return {SPEC_TAG: spec, REPRODUCES_TAG: reproduces, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}


def spec_filter(spec: str) -> str:
    """Experiments tagged as the spec's (an experiment renamed after it was made)."""
    return f"tags.{SPEC_TAG} = '{spec}'"


def parents_filter(campaign: str | None = None) -> str:
    """Parent runs (of one campaign, when given)."""
    role = f"tags.`{ROLE_TAG}` = '{PARENT_ROLE}'"
    return f"tags.`{CAMPAIGN_TAG}` = '{campaign}' and {role}" if campaign else role


def children_filter(parent_id: str) -> str:
    """The child runs of a parent run."""
    return f"tags.`{PARENT_ID_TAG}` = '{parent_id}'"


def parent_of(tags: Mapping[str, str]) -> str | None:
    """The parent run id a run's tags name (None for a parent run)."""
    return tags.get(PARENT_ID_TAG)


def is_parent(tags: Mapping[str, str]) -> bool:
    """A parent run: tagged so, or (made without role tags) a run that is nobody's child."""
    return tags.get(ROLE_TAG) == PARENT_ROLE or (
        PARENT_ID_TAG not in tags and tags.get(ROLE_TAG) != TRIAL_ROLE)


def search_all(client, experiment_ids: list[str], filter_string: str = "",
               order_by: list[str] | None = None) -> list:
    """Every run matching the filter: all pages of `client.search_runs` (an MlflowClient)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


NEWEST_FIRST = ["attributes.start_time DESC"]
OLDEST_FIRST = ["attributes.start_time ASC"]

# --------------------------------------------------------------------------------------------
# The MLflow UI's first screen: a shared view comparing a campaign's arms
# --------------------------------------------------------------------------------------------

# MLflow 3.17's UI restores a "shared view" named by the URL parameter `viewStateShareKey`
# from the experiment tag `mlflow.sharedViewState.<key>`, a JSON object (or its gzip+base64).
# From it the runs page takes exactly these search facets and this UI state (read from the
# 3.17 JS bundle: the facet keys of its URL search state; its UI-state keys minus the per-run
# ones it leaves out of a shared view — runsExpanded, runsPinned, runsHidden,
# runsVisibilityMap, autoRefreshEnabled); a key missing keeps the UI's default. Columns are
# ag-grid column ids: `metrics.`<key>``, `tags.`<key>``, `attributes.`Run Name``;
# `columnOrder` (with `columnWidths`) is applied as ag-grid column state, the columns it does
# not list after those it lists. A group's id in `groupsExpanded` is `<mode>.<key>.<value>`;
# a group left out is expanded. The URL's `compareRunsMode` (TABLE, CHART) picks the view.
# The runs route lands on "Training runs", where the experiment's root lands on the GenAI
# overview whatever `mlflow.experimentKind` says (the sidebar's GenAI / Model training toggle
# lives in the browser; MLflow issue 24498).
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
SHARED_VIEW_FACETS = ("searchFilter", "orderByKey", "orderByAsc", "startTime",
                      "lifecycleFilter", "modelVersionFilter", "datasetsFilter")
SHARED_VIEW_UI_STATE = ("selectedColumns", "columnOrder", "columnWidths", "runsHiddenMode",
                        "compareRunCharts", "compareRunSections", "viewMaximized",
                        "runListHidden", "isAccordionReordered", "groupBy", "groupsExpanded",
                        "useGroupedValuesInCharts", "hideEmptyCharts", "globalLineChartConfig",
                        "chartsSearchFilter")
RUN_NAME_COLUMN = "attributes.`Run Name`"
# Wide enough for a group's label, "Group: <arm>" (the UI's default is 190 px).
RUN_NAME_WIDTH = 320


def comparison_view_tag(parent_id: str) -> str:
    """The experiment tag holding the comparison view of a campaign (key: its parent run)."""
    return f"{SHARED_VIEW_TAG_PREFIX}{parent_id}"


def metric_column(key: str) -> str:
    """The MLflow UI's column id of a metric."""
    return f"metrics.`{key}`"


def tag_column(key: str) -> str:
    """The MLflow UI's column id of a tag."""
    return f"tags.`{key}`"


def comparison_view(parent_id: str, metric_keys: Iterable[str]) -> dict[str, Any]:
    """The runs table of one campaign (a shared view, above): its child runs only, one row
    group per arm (`arm` tag) with the metrics averaged over its seeds and its seeds' rows
    under it, groups in arm order, and as columns `metric_keys` (the summary table's, then the
    floors and the ceiling) in that order, then each trial's seed."""
    metrics = [metric_column(k) for k in metric_keys]
    columns = metrics + [tag_column(SEED_TAG)]
    return {
        "searchFilter": children_filter(parent_id), "orderByKey": tag_column(ARM_TAG),
        "orderByAsc": True, "startTime": "ALL", "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "selectedColumns": columns, "columnOrder": [RUN_NAME_COLUMN, *columns],
        "columnWidths": {RUN_NAME_COLUMN: RUN_NAME_WIDTH},
        # charts show every run (the UI's default is the first 10)
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": ARM_TAG}]},
        "groupsExpanded": {}, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
        "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
    }


def comparison_address(base_url: str, experiment_id: str, share_key: str | None = None) -> str:
    """The UI address of the runs table of an experiment, in the shared view `share_key` (a
    campaign's comparison view: its parent run id) when given."""
    url = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?compareRunsMode=TABLE"
    return url + (f"&viewStateShareKey={share_key}" if share_key else "")


# --------------------------------------------------------------------------------------------
# Tags of parent and child runs
# --------------------------------------------------------------------------------------------

PRESET_TAG = "preset"
ARM_TAG = "arm"
SEED_TAG = "seed"
STAGES_TAG = "stages"
GIT_COMMIT_TAG = "git_commit"
COMMAND_TAG = "command"
N_TRIALS_TAG = "n_trials"
RAY_TRIAL_TAG = "ray_trial_id"
RESUMED_TAG = "resumed"
INTERRUPTED_TAG = "interrupted"
ERROR_TAG = "error"
ARTIFACT_ERROR_TAG = "artifact_error"
UNAVAILABLE_PREFIX = "eval_unavailable."
SEARCH_KEY_PREFIX = "search-"
# Where a trial ran (values: sftok_experiments/placement.py). `placement.<name>` describes the
# process that trained (rank 0 of a data-parallel trial); `placement.workers` is the world size W
# and, when W > 1, `placement.rank<r>.<name>` describes rank r.
PLACEMENT_PREFIX = "placement."
WORKERS_TAG = PLACEMENT_PREFIX + "workers"


def placement_tag(name: str, rank: int | None = None) -> str:
    """`placement.<name>`, or rank r's `placement.rank<r>.<name>`."""
    return f"{PLACEMENT_PREFIX}{name}" if rank is None else f"{PLACEMENT_PREFIX}rank{rank}.{name}"


def parent_tags(*, spec: str, preset: str, commit: str, dirty: bool, command: str,
                campaign: str, reproduces: str, report: str, spec_file: str, n_trials: int,
                overrides: str = "") -> dict[str, str]:
    """The tags a parent run is created with."""
    tags = {ROLE_TAG: PARENT_ROLE, SPEC_TAG: spec, PRESET_TAG: preset, GIT_COMMIT_TAG: commit,
            "git_dirty": str(dirty).lower(), COMMAND_TAG: command, CAMPAIGN_TAG: campaign,
            REPRODUCES_TAG: reproduces, "report": report, "spec_file": spec_file,
            N_TRIALS_TAG: str(n_trials)}
    if overrides:
        tags["overrides"] = overrides
    return tags


def parent_run_name(spec: str, preset: str, stamp: str) -> str:
    return f"{spec}-{preset}-{stamp}"


def resume_tags(n: int, command: str) -> dict[str, Any]:
    """Tags of the n-th resumption of a parent run."""
    return {RESUMED_TAG: n, f"{COMMAND_TAG}.resume{n}": command}


def resume_count(tags: Mapping[str, str]) -> int:
    return int(tags.get(RESUMED_TAG, "0"))


def teacher_tag(i: int) -> str:
    """The parent's tag naming the cache key of its i-th distinct teacher."""
    return f"teacher.{i}"


def closing_tags(*, n_finished: int, n_failed: int, wall_s: float,
                 skipped: Mapping[str, int]) -> dict[str, Any]:
    """The tags a parent run gets when its invocation ends (skipped: 'train'/'val' counts)."""
    return {"n_finished": n_finished, "n_failed": n_failed, "wall_s": f"{wall_s:.1f}",
            **{f"data_skipped.{k}": v for k, v in skipped.items()}}


def search_trial_key(ray_trial_id: str) -> str:
    """The trial key of an Optuna sample (expanded trials have `<arm>_s<seed>`)."""
    return f"{SEARCH_KEY_PREFIX}{ray_trial_id}"


def trial_tags(*, parent_id: str, arm: str, seed: int, key: str, spec: str, preset: str,
               ray_trial_id: str, stages: Iterable[str], arm_values: Mapping[str, Any],
               search_values: Mapping[str, Any]) -> dict[str, Any]:
    """The tags a child run is created with."""
    tags: dict[str, Any] = {
        PARENT_ID_TAG: parent_id, ROLE_TAG: TRIAL_ROLE, ARM_TAG: arm, SEED_TAG: str(seed),
        KEY_TAG: key, SPEC_TAG: spec, PRESET_TAG: preset, RAY_TRIAL_TAG: ray_trial_id,
        STAGES_TAG: stages_value(stages)}
    tags.update({f"{ARM_TAG}.{k}": v for k, v in arm_values.items()})
    tags.update({search_tag(k): v for k, v in search_values.items()})
    return tags


def search_tag(field: str) -> str:
    """The child tag holding an Optuna sample's value of config `field`, verbatim."""
    return f"search.{field}"


def stages_value(stages: Iterable[str]) -> str:
    """The `stages` tag and param: the trial's pipeline, comma-separated."""
    return ",".join(stages)


def stage_tags(stage: str, source: str, key: str) -> dict[str, str]:
    """Where a trial's stage result came from: trained here or reused, and its content key."""
    return {f"stage.{stage}.source": source, f"stage.{stage}.key": key}


def unavailable_tags(unavailable: Mapping[str, str]) -> dict[str, str]:
    """eval.json's `unavailable` (metric -> why) as child tags."""
    return {f"{UNAVAILABLE_PREFIX}{k}": v for k, v in unavailable.items()}


def unavailable_from_tags(tags: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `unavailable_tags` (other tags are ignored)."""
    return {k[len(UNAVAILABLE_PREFIX):]: v for k, v in tags.items()
            if k.startswith(UNAVAILABLE_PREFIX)}


# --------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------

ARM_PARAM, STAGES_PARAM = ARM_TAG, STAGES_TAG  # params beside the flattened config
PARAM_LIMIT = 6000  # characters MLflow keeps of a param value


def trial_params(flat_config: Mapping[str, Any], stages: Iterable[str], arm: str
                 ) -> dict[str, str]:
    """A child run's params: the flattened resolved config plus `stages` and `arm`."""
    params = {k: param_str(v) for k, v in flat_config.items()}
    params[STAGES_PARAM] = stages_value(stages)
    params[ARM_PARAM] = arm
    return params


def param_str(value: Any) -> str:
    """How a config value is stored as a param: JSON for lists / dicts, else str()."""
    s = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return s[:PARAM_LIMIT]


def coerce_param(value: str | None) -> Any:
    """A param (or tag) string back to a value: int, float, bool, None, else the string."""
    if value is None:
        return None
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# --------------------------------------------------------------------------------------------
# Metric keys
# --------------------------------------------------------------------------------------------

TRAIN, EVAL, TRACE = "train/", "eval/", "trace/"
_TRAIN_KEY = re.compile(r"^train/([^/]+)/(.+)$")
_STEP_METRIC = re.compile(r"^(.+)_s(\d+)$")
_SWEEP_METRIC = re.compile(r"^sweep/(?P<schedule>[^/]+)/s(?P<scale>[^/]+)/tau(?P<tau>[^/]+)/"
                           r"(?P<metric>[^/]+)$")



def floor_prefix(codec: str) -> str:
    """The prefix of the floor named `codec` in `bounds.Bounds.floors` ('tokenizer')."""
    return f"floor_{codec}"


# The floors and the ceiling of sftok/evaluate/bounds.py, as metric-name prefixes
# "<prefix>_<metric>": naive codecs with the tokenizer's / the teacher's bits, and the teacher.
FLOOR_TOKENIZER, FLOOR_TEACHER = floor_prefix("tokenizer"), floor_prefix("teacher")
FLOOR_PREFIXES = (FLOOR_TOKENIZER, FLOOR_TEACHER)
CEILING_PREFIX = "teacher"
BOUND_PREFIXES = (*FLOOR_PREFIXES, CEILING_PREFIX)


def train_key(stage: str, name: str) -> str:
    """`train/<stage>/<name>`: a training metric (step = the trial's global optimiser step)."""
    return f"{TRAIN}{stage}/{name}"


def train_prefix(stage: str) -> str:
    return f"{TRAIN}{stage}/"


def parse_train_key(key: str) -> tuple[str, str] | None:
    """`train/<stage>/<name>` -> (stage, name); None for other keys."""
    m = _TRAIN_KEY.match(key)
    return (m.group(1), m.group(2)) if m else None


def eval_key(name: str) -> str:
    """`eval/<name>` for an evaluator's flat metric name (`psnr_s8`, `token_top1`, ...)."""
    return f"{EVAL}{name}"


def eval_name(key: str) -> str | None:
    """The evaluator's name of an `eval/` key; None for other keys."""
    return key[len(EVAL):] if key.startswith(EVAL) else None


def trace_key(column: str) -> str:
    """`trace/<column>` of a trace.csv column (step = the decode step)."""
    return f"{TRACE}{column}"


def trace_column(key: str) -> str | None:
    return key[len(TRACE):] if key.startswith(TRACE) else None


def step_metric(metric: str, steps: int) -> str:
    """`<metric>_s<S>`: a metric of an S-step decode (`psnr_s8`)."""
    return f"{metric}_s{steps}"


def parse_step_metric(name: str) -> tuple[str, int] | None:
    """`<metric>_s<S>` -> (metric, S); None for an S-independent name."""
    m = _STEP_METRIC.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def bound_metric(prefix: str, metric: str) -> str:
    """`<prefix>_<metric>`: a metric of a floor or the ceiling (`floor_tokenizer_psnr`)."""
    return f"{prefix}_{metric}"


# The revealed-token information (sftok/evaluate/revealed.py), per fraction r of positions
# revealed: `reveal_<kind>_r<100·r>`, e.g. `reveal_info_gt_r50`.
REVEAL_KINDS = ("ce_none", "ce_gt", "ce_self", "info_gt", "info_self")
_REVEAL_METRIC = re.compile(r"^reveal_(?P<kind>[a-z_]+?)_r(?P<pct>\d+)$")


def reveal_metric(kind: str, fraction: float) -> str:
    """`reveal_<kind>_r<pct>`: reveal_metric('info_gt', 0.5) == 'reveal_info_gt_r50'."""
    if kind not in REVEAL_KINDS:
        raise ValueError(f"unknown reveal kind {kind!r} (known: {', '.join(REVEAL_KINDS)})")
    return f"reveal_{kind}_r{round(100 * fraction)}"


def parse_reveal_metric(name: str) -> tuple[str, float] | None:
    """`reveal_<kind>_r<pct>` -> (kind, fraction); None for other names."""
    m = _REVEAL_METRIC.match(name)
    if m is None or m["kind"] not in REVEAL_KINDS:
        return None
    return m["kind"], int(m["pct"]) / 100


def sweep_metric(schedule: str, scale: float, temperature: float, metric: str) -> str:
    """A guidance-sweep point's metric: `sweep/<schedule>/s<scale>/tau<temperature>/<metric>`."""
    return f"sweep/{schedule}/s{scale:g}/tau{temperature:g}/{metric}"


def parse_sweep_metric(name: str) -> dict[str, Any] | None:
    """`sweep/...` -> {schedule, scale, temperature, metric}; None for other names."""
    m = _SWEEP_METRIC.match(name)
    if m is None:
        return None
    return {"schedule": m["schedule"], "scale": float(m["scale"]),
            "temperature": float(m["tau"]), "metric": m["metric"]}


def stage_count_metrics(*, trained: int, reused: int, steps_trained: int, steps_reused: int
                        ) -> dict[str, int]:
    """The parent's counts of the stage results its trials trained and reused."""
    return {"campaign/stages_trained": trained, "campaign/stages_reused": reused,
            "campaign/stage_steps_trained": steps_trained,
            "campaign/stage_steps_reused": steps_reused}


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------

CONFIG_JSON, EVAL_JSON, TRACE_CSV = "config.json", "eval.json", "trace.csv"
GENERATION_JSON, SWEEP_CSV = "generation.json", "sweep.csv"
GRIDS, CHECKPOINT = "grids", "checkpoint"
SAMPLES_PNG = "samples.png"
ERROR_TXT, SUMMARY_TXT, PLAN_JSON = "error.txt", "summary.txt", "plan.json"
ANALYSIS = "analysis"
# What a trial's artifacts directory may hold, as the tracker logs it.
TRIAL_FILES = (CONFIG_JSON, EVAL_JSON, TRACE_CSV, GENERATION_JSON, SWEEP_CSV)
TRIAL_DIRS = (GRIDS, CHECKPOINT)


def recon_grid(steps: int) -> str:
    """Path of the S-step reconstruction grid (originals over reconstructions)."""
    return f"{GRIDS}/recon_s{steps}.png"


def samples_grid(cls: int | None = None) -> str:
    """Path of the generation sample grid (one row per class), or of one class's row."""
    return f"{GRIDS}/{SAMPLES_PNG}" if cls is None else f"{GRIDS}/samples_class{cls}.png"


def teacher_info_path(key: str) -> str:
    """The parent's artifact describing the stage-0 teacher with cache key `key`."""
    return f"teacher/{key}.json"


def analysis_path(notebook: str) -> str:
    """Where a notebook's outputs are logged on the parent runs it read."""
    return f"{ANALYSIS}/{notebook}"


def write_json(path: Path, doc: Any, default=float) -> Path:
    """doc as JSON; `default` turns what JSON lacks (numpy numbers, paths) into a value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=default))
    return path


def write_csv(path: Path, rows: list[Mapping[str, Any]], columns: list[str] | None = None
              ) -> Path | None:
    """rows as CSV (columns: the first row's keys unless given); nothing for no rows."""
    if not rows:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_png(path: Path, image) -> Path:
    """An H×W×3 uint8 array as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_config(out: Path, config: Mapping[str, Any], **trial: Any) -> Path:
    """config.json: the resolved config, plus the trial's stages, arm, seed and arm_values."""
    return write_json(out / CONFIG_JSON, {"config": dict(config), **trial})


def write_eval(out: Path, metrics: Mapping[str, float], unavailable: Mapping[str, str]) -> Path:
    """eval.json: the evaluator's flat metrics and why the missing ones are missing."""
    return write_json(out / EVAL_JSON, {"metrics": dict(metrics),
                                        "unavailable": dict(unavailable)})


def read_unavailable(out: Path) -> dict[str, str]:
    """eval.json's `unavailable` ({} when there is no eval.json)."""
    path = out / EVAL_JSON
    return (json.loads(path.read_text()).get("unavailable") or {}) if path.exists() else {}


def read_eval_metrics(out: Path) -> dict[str, float]:
    """eval.json's `metrics` (the evaluator's flat names)."""
    return dict(json.loads((out / EVAL_JSON).read_text())["metrics"])


def write_recon_grids(out: Path, grids: Mapping[int, Any]) -> None:
    for steps, image in grids.items():
        write_png(out / recon_grid(steps), image)


def write_trial_artifacts(out: Path, config: Mapping[str, Any], trial: Mapping[str, Any],
                          metrics: Mapping[str, float], unavailable: Mapping[str, str],
                          trace: list[Mapping[str, Any]], grids: Mapping[int, Any],
                          checkpoint: Path | None) -> Path:
    """A child run's artifacts directory (module docstring). trial: the trial's payload
    (stages, arm, seed, arm_values); trace: rows of the Figure-4a trace; grids: S -> image."""
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, config, stages=trial["stages"], arm=trial["arm"], seed=trial["seed"],
                 arm_values=trial.get("arm_values", {}))
    write_eval(out, metrics, unavailable)
    write_csv(out / TRACE_CSV, list(trace))
    write_recon_grids(out, grids)
    if checkpoint is not None:
        shutil.copytree(checkpoint, out / CHECKPOINT)
    return out


def trace_metrics(rows: list[Mapping[str, str]]) -> dict[int, dict[str, float]]:
    """trace.csv rows -> {decode step: {`trace/<column>`: value}} (non-numbers left out)."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        values = dict(row)
        step = int(float(values.pop("step")))
        for k, v in values.items():
            try:
                out.setdefault(step, {})[trace_key(k)] = float(v)
            except (TypeError, ValueError):
                continue
    return out
