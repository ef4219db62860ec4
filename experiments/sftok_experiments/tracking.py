"""The single MLflow writer (DESIGN §2): everything a campaign logs goes through the driver.

Layout: one experiment per spec; one parent run per invocation (tags `spec`, `preset`,
`git_commit`, `command`, `sftok.role=parent`, `sftok.campaign=<hash>`); one child run per
trial (`mlflow.parentRunId`, `sftok.role=trial`, `arm`, `seed`, `trial_key`, `ray_trial_id`;
params = the flattened resolved config). Metrics `train/<stage>/<name>` (step = global
optimiser step), `eval/<name>` (step 0), `trace/<name>` (step = decode step i); child tags
`stage.<stage>.source` (trained / reused) and `stage.<stage>.key` (the stage result's content
address, `stage_store.py`); parent metrics `campaign/stages_trained`, `campaign/stages_reused`
(and their `stage_steps_*`, step = resume count). Artifacts
`config.json`, `eval.json`, `trace.csv`, `grids/recon_s<S>.png`, `checkpoint/`.

`MlflowTracker` is a `tune.Callback`: Ray calls it in the driver for every trial event, so
trials on any node only need `tune.report` (metrics) and their checkpoint (artifacts), and
concurrent trials never race on the SQLite store. Resume: existing children are found by the
tag `trial_key` under the parent and reused, never duplicated; metric points at steps already
logged are skipped (a retried trial re-reports the steps after its last checkpoint).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from sftok_experiments import ROOT

PARENT_ROLE = "parent"
TRIAL_ROLE = "trial"
CAMPAIGN_TAG = "sftok.campaign"
KEY_TAG = "trial_key"
PARENT_ID_TAG = "mlflow.parentRunId"


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


def resolve_store(tracking: str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact root or None). Default: ./mlruns (mlflow.db + artifacts/).

    A plain directory is a store of the same layout; a URI (sqlite:, http:, file:, ...) is used
    as given with the server's / MLflow's default artifact location.
    """
    if tracking is None:
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or str(ROOT / "mlruns")
    if "://" in tracking or tracking.startswith(("sqlite:", "databricks")):
        m = tracking.removeprefix("sqlite:///")
        if tracking.startswith("sqlite:///"):
            store = Path(m).parent
            store.mkdir(parents=True, exist_ok=True)
            return tracking, (store / "artifacts").resolve().as_uri()
        return tracking, None
    store = Path(tracking).expanduser().resolve()
    store.mkdir(parents=True, exist_ok=True)
    (store / "artifacts").mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores or in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive file lock next to a SQLite store while its schema is created / migrated.

    MLflow creates and migrates the schema on first open; two campaigns opening a new store at
    once both ran the migration and one died (`table ... already exists`). Other stores (a
    server, a database that is not a file) serialise this themselves.
    """
    from sftok.filelock import exclusive_lock

    db = _sqlite_file(uri)
    if db is None:
        yield
        return
    with exclusive_lock(db.with_name(db.name + ".lock")):
        yield


def client_for(uri: str):
    """An MlflowClient whose store exists and is migrated (safe with concurrent campaigns)."""
    import logging

    from mlflow.tracking import MlflowClient

    # SQLite schema migrations log at INFO on first use; keep the console for trial events.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # opens the store: creates / migrates it
    return client


# MLflow 3's UI opens an experiment in the view its kind names; without the tag it shows the
# GenAI (traces) overview, where training runs, their metrics and charts are not listed.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_experiment(client, name: str, artifact_root: str | None, tags: dict[str, str]) -> str:
    """The id of experiment `name`, created (with `tags`) if missing, restored if deleted."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        loc = f"{artifact_root}/{name}" if artifact_root else None
        try:
            return client.create_experiment(
                name, artifact_location=loc, tags={**tags, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # another campaign created it just now
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version of this runner
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def git_commit() -> tuple[str, bool]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return sha or "unknown", dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def _search_all(client, exp_id: str, filter_string: str, order_by=None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_resumable_parent(client, exp_id: str, campaign: str):
    """The latest parent run of this campaign (same spec content, preset and trials)."""
    runs = _search_all(client, exp_id, f"tags.`{CAMPAIGN_TAG}` = '{campaign}' and "
                                       f"tags.`sftok.role` = '{PARENT_ROLE}'",
                       order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def recent_parents(client, exp_id: str, n: int = 5) -> list:
    """The spec's latest parent runs (any campaign), newest first."""
    return client.search_runs([exp_id], filter_string=f"tags.`sftok.role` = '{PARENT_ROLE}'",
                              max_results=n, order_by=["attributes.start_time DESC"])


def children_of(client, exp_id: str, parent_id: str) -> dict[str, Any]:
    """trial_key -> latest child run under the parent."""
    runs = _search_all(client, exp_id, f"tags.`{PARENT_ID_TAG}` = '{parent_id}'",
                       order_by=["attributes.start_time ASC"])
    return {r.data.tags[KEY_TAG]: r for r in runs if KEY_TAG in r.data.tags}


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100], synchronous=True)


def _param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return s[:6000]


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000], synchronous=True)


def set_tags(client, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[i:i + 100], synchronous=True)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)


# --------------------------------------------------------------------------------------------
# The tune.Callback
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%H:%M:%S")


def _trace_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class TrialRecord:
    def __init__(self, key: str, arm: str, seed: int, run_id: str | None = None):
        self.key, self.arm, self.seed, self.run_id = key, arm, seed, run_id
        self.status = "PENDING"
        self.metrics: dict[str, float] = {}
        self.error: str | None = None
        self.last_step: dict[str, int] = {}  # metric key -> last logged step
        self.got_final = False
        self.started = None
        self.seconds = 0.0
        self.retries = 0
        self.stage_sources: dict[str, tuple[str, str, int]] = {}  # stage -> (source, key, steps)
        self.skipped: dict[str, int] = {}  # "train" (max over stages) / "val": bad image files
        self.progress = None  # progress.StageProgress, made on the first train report


def _make_tracker_class():
    from ray import tune

    class MlflowTracker(tune.Callback):
        """Creates a child run per trial and logs params/tags/metrics/artifacts (driver only)."""

        def __init__(self, client, experiment_id: str, parent_id: str, spec_name: str,
                     preset: str, existing: dict[str, Any] | None = None,
                     echo=print, progress_every: float = 30.0):
            self.client = client
            self.exp_id = experiment_id
            self.parent_id = parent_id
            self.spec_name = spec_name
            self.preset = preset
            self.existing = dict(existing or {})  # key -> MLflow run (from an earlier invocation)
            self.records: dict[str, TrialRecord] = {}  # by ray trial id
            self.echo = echo
            self.progress_every = progress_every  # seconds between progress lines of a trial

        # Ray pickles the run config (tuner.pkl, for Tuner.restore); the store client and the
        # console are driver-only and are not part of that state.
        def __getstate__(self):
            state = dict(self.__dict__)
            state["client"] = None
            state["echo"] = None
            return state

        # -- helpers -------------------------------------------------------------------------
        def _key(self, trial) -> str:
            if trial.config.get("search"):
                return f"search-{trial.trial_id}"
            return trial.config["trial"]["key"]

        def _record(self, trial) -> TrialRecord:
            rec = self.records.get(trial.trial_id)
            if rec is None:
                p = trial.config["trial"]
                arm = p["arm"]
                if trial.config.get("search"):  # an Optuna sample: label it by its values
                    arm = ",".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}"
                                   for k, v in trial.config["search"].items())
                rec = TrialRecord(self._key(trial), arm, p["seed"])
                self.records[trial.trial_id] = rec
            return rec

        def _line(self, rec: TrialRecord, what: str) -> None:
            self.echo(f"[{_now()}] trial {rec.key:<24} {what}", flush=True)

        def _open_run(self, trial, rec: TrialRecord) -> None:
            from sftok.config import flatten, to_dict
            from sftok_experiments.trial import resolved_config

            payload = trial.config["trial"]
            prev = self.existing.get(rec.key)
            if prev is not None:  # resumed: reuse the child, drop points already logged
                rec.run_id = prev.info.run_id
                self.client.update_run(rec.run_id, status="RUNNING")
                if "error" in prev.data.tags:  # the earlier attempt's error no longer applies
                    self.client.delete_tag(rec.run_id, "error")
                for k in prev.data.metrics:
                    if k.startswith("train/"):
                        hist = self.client.get_metric_history(rec.run_id, k)
                        if hist:
                            rec.last_step[k] = max(m.step for m in hist)
                set_tags(self.client, rec.run_id, {"ray_trial_id": trial.trial_id,
                                                   "resumed": "true"})
                return
            cfg = resolved_config(trial.config)
            tags = {PARENT_ID_TAG: self.parent_id, "sftok.role": TRIAL_ROLE, "arm": rec.arm,
                    "seed": str(rec.seed), KEY_TAG: rec.key, "spec": self.spec_name,
                    "preset": self.preset, "ray_trial_id": trial.trial_id,
                    "stages": ",".join(payload["stages"])}
            for k, v in (payload.get("arm_values") or {}).items():
                tags[f"arm.{k}"] = v
            for k, v in (trial.config.get("search") or {}).items():
                tags[f"search.{k}"] = v
            run = self.client.create_run(self.exp_id, run_name=rec.key, tags=tags)
            rec.run_id = run.info.run_id
            params = flatten(to_dict(cfg))
            params["stages"] = ",".join(payload["stages"])
            params["arm"] = rec.arm
            log_params(self.client, rec.run_id, params)

        # -- Ray Tune hooks ------------------------------------------------------------------
        def on_trial_start(self, iteration, trials, trial, **info):
            rec = self._record(trial)
            if rec.run_id is None:
                self._open_run(trial, rec)
            rec.status = "RUNNING"
            rec.started = rec.started or time.time()
            self._line(rec, f"started   arm={rec.arm} seed={rec.seed} run={rec.run_id[:8]}")

        def on_trial_recover(self, iteration, trials, trial, **info):
            rec = self._record(trial)
            rec.retries += 1
            self._line(rec, f"crashed, retrying from its last checkpoint "
                            f"(retry {rec.retries}): {rec.error or _error_summary(trial)}")
            rec.error = None  # the next attempt reports its own
            rec.progress = None  # and its own speed

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rec = self._record(trial)
            if rec.run_id is None:
                self._open_run(trial, rec)
            event = result.get("event")
            where = {k: v for k, v in result.items() if k.startswith("placement.")}
            if where:  # where and when the trial ran (sftok_experiments.placement)
                set_tags(self.client, rec.run_id, where)
            if event == "train":
                step = int(result.get("global_step", 0))
                m = {k: v for k, v in result.items() if k.startswith("train/")
                     and isinstance(v, (int, float)) and step > rec.last_step.get(k, -1)}
                for k in m:
                    rec.last_step[k] = step
                if m:
                    log_metrics(self.client, rec.run_id, m, step)
                self._progress(trial, rec, str(result.get("stage")), step, result)
                skipped = [int(v) for k, v in result.items() if k.endswith("/data_skipped")]
                if skipped:
                    rec.skipped["train"] = max(rec.skipped.get("train", 0), *skipped)
            elif event == "stage_done":
                stage, source = result.get("stage"), result.get("source")
                if source and stage not in rec.stage_sources:  # a retry re-reports: keep the first
                    rec.stage_sources[stage] = (source, str(result.get("key", "")),
                                                int(result.get("steps", 0)))
                    set_tags(self.client, rec.run_id, {f"stage.{stage}.source": source,
                                                       f"stage.{stage}.key": result.get("key")})
                how = f", {source} {result.get('key')}" if source else ""
                self._line(rec, f"{stage} done (global step {result.get('global_step')}{how})")
            elif event == "error":  # sent by trial.guarded just before the trial fails
                rec.error = str(result.get("error") or "") or None
                if not result.get("retry", True):
                    # Deterministic (a non-finite loss, a bad config value): a retry would
                    # fail the same way. Ray's FailureConfig cannot tell error kinds apart;
                    # with no retries left for this trial its failure is final.
                    trial.max_failures = 0
            elif event == "final":
                m = {k: v for k, v in result.items() if k.startswith("eval/")
                     and isinstance(v, (int, float))}
                log_metrics(self.client, rec.run_id, m, 0)
                rec.metrics.update(m)
                rec.got_final = True
                if "eval/skipped_images" in m:
                    rec.skipped["val"] = int(m["eval/skipped_images"])

        def on_trial_complete(self, iteration, trials, trial, **info):
            rec = self._record(trial)
            if rec.run_id is None:
                self._open_run(trial, rec)
            rec.seconds = time.time() - (rec.started or time.time())
            if not rec.got_final:
                # Stopped before its final report (e.g. the campaign was interrupted).
                rec.status = "KILLED"
                self.client.set_terminated(rec.run_id, status="KILLED")
                self._line(rec, "stopped before finishing (resume with --resume)")
                return
            try:
                self._log_artifacts(trial, rec)
            except Exception as e:  # noqa: BLE001 — a logging problem must not hide the result
                self._line(rec, f"warning: could not log artifacts: {e}")
                set_tags(self.client, rec.run_id, {"artifact_error": str(e)})
            rec.status = "FINISHED"
            self.client.set_terminated(rec.run_id, status="FINISHED")
            self._line(rec, f"finished in {rec.seconds:.0f}s  " + _short_metrics(rec.metrics))

        def on_trial_error(self, iteration, trials, trial, **info):
            rec = self._record(trial)
            if rec.run_id is None:
                self._open_run(trial, rec)
            rec.seconds = time.time() - (rec.started or time.time())
            text = _error_text(trial)
            rec.error = rec.error or _error_summary(trial)
            rec.status = "FAILED"
            set_tags(self.client, rec.run_id, {"error": rec.error})
            try:
                self.client.log_text(rec.run_id, text, "error.txt")
            except Exception:  # noqa: BLE001
                pass
            self.client.set_terminated(rec.run_id, status="FAILED")
            self._line(rec, f"FAILED: {rec.error} (traceback: error.txt of run "
                            f"{rec.run_id[:8]})")

        def _progress(self, trial, rec: TrialRecord, stage: str, step: int, result) -> None:
            from sftok_experiments.expand import stage_steps
            from sftok_experiments.progress import StageProgress
            from sftok_experiments.trial import resolved_config

            if rec.progress is None:
                stages = list(trial.config["trial"]["stages"])
                cfg = resolved_config(trial.config)
                rec.progress = StageProgress(stages, {s: stage_steps(cfg, s) for s in stages},
                                             self.progress_every)
            prefix = f"train/{stage}/"
            line = rec.progress.update(stage, step, {k[len(prefix):]: v for k, v in result.items()
                                                     if k.startswith(prefix)})
            if line:
                self._line(rec, line)

        # -- artifacts -----------------------------------------------------------------------
        def _log_artifacts(self, trial, rec: TrialRecord) -> None:
            ckpt = trial.checkpoint
            if ckpt is None:
                return
            with ckpt.as_directory() as d:
                d = Path(d)
                for name in ("config.json", "eval.json", "trace.csv", "generation.json",
                             "sweep.csv"):
                    if (d / name).exists():
                        self.client.log_artifact(rec.run_id, str(d / name))
                for sub in ("grids", "checkpoint"):
                    if (d / sub).is_dir():
                        self.client.log_artifacts(rec.run_id, str(d / sub), sub)
                if (d / "trace.csv").exists():
                    for row in _trace_rows(d / "trace.csv"):
                        step = int(float(row.pop("step")))
                        vals = {}
                        for k, v in row.items():
                            try:
                                vals[f"trace/{k}"] = float(v)
                            except (TypeError, ValueError):
                                continue
                        log_metrics(self.client, rec.run_id, vals, step)
                if (d / "eval.json").exists():
                    un = json.loads((d / "eval.json").read_text()).get("unavailable") or {}
                    if un:
                        set_tags(self.client, rec.run_id,
                                 {f"eval_unavailable.{k}": v for k, v in un.items()})

    return MlflowTracker


def MlflowTracker(*args, **kwargs):
    return _make_tracker_class()(*args, **kwargs)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()
    err = trial.get_error() if hasattr(trial, "get_error") else None
    if err is not None:
        return "".join(traceback.format_exception(err))
    return "unknown error"


def _error_summary(trial) -> str:
    text = _error_text(trial).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # The last line of a traceback names the exception; Ray wraps it in RayTaskError(...).
    for ln in reversed(lines):
        s = ln.strip()
        if ("Error" in s or "Exception" in s) and not s.startswith(("File ", "ray.")):
            return s[:500]
    return (lines[-1] if lines else "unknown error")[:500]


KEY_METRICS = ("psnr", "ssim", "lpips", "rfid")
GENERATION_SUMMARY = ("eval/gfid", "eval/is", "eval/calib_fid_recon", "eval/sample_codebook_usage")


def _short_metrics(metrics: dict[str, float]) -> str:
    keys = summary_metric_keys([metrics])
    return "  ".join(f"{k.removeprefix('eval/')}={metrics[k]:.4g}" for k in keys if k in metrics)


def bounds_lines(all_metrics: list[dict[str, float]]) -> list[str]:
    """'floor/ceiling' lines for the summary: the naive-codec floors and the teacher ceiling
    (sftok.evaluate.bounds), identical for trials sharing data and teacher (first one shown)."""
    from sftok.evaluate.bounds import BOUND_PREFIXES

    out = []
    for prefix in BOUND_PREFIXES:
        values = next((m for m in all_metrics if any(k.startswith(f"eval/{prefix}_") for k in m)),
                      None)
        if values is None:
            continue
        cells = [f"{k.removeprefix(f'eval/{prefix}_')} {v:.4f}" for k, v in sorted(values.items())
                 if k.startswith(f"eval/{prefix}_")]
        out.append(f"{prefix:<16} " + "  ".join(cells))
    return ([""] + out) if out else []


def summary_metric_keys(all_metrics: list[dict[str, float]]) -> list[str]:
    """eval/<m>_s<S> at the largest S present for the key metrics, then token_top1."""
    present = set().union(*[set(m) for m in all_metrics]) if all_metrics else set()
    out = []
    for m in KEY_METRICS:
        steps = [int(k.rsplit("_s", 1)[1]) for k in present
                 if k.startswith(f"eval/{m}_s") and k.rsplit("_s", 1)[1].isdigit()]
        if steps:
            out.append(f"eval/{m}_s{max(steps)}")
    if "eval/token_top1" in present:
        out.append("eval/token_top1")
    # Generation trials (Table 2) report S-independent names.
    out += [k for k in GENERATION_SUMMARY if k in present]
    return out
