"""The single MLflow writer (DESIGN §2): everything a campaign logs goes through the driver.

The record it writes (experiment, parent run, child runs: tags, params, metrics, artifacts) is
laid out in `sftok.run_record`. `ParentRun` opens (or resumes), tags and closes the parent run of
an invocation and logs stage 0 on it; `MlflowTracker` is a `tune.Callback` that makes and fills
the child run of every trial.

Ray calls the tracker in the driver for every trial event, so trials on any node only need
their reports (`protocol`: metrics) and their checkpoint (artifacts), and concurrent trials
never race on the SQLite store. Resume: existing children are found by the tag `trial_key`
under the parent and reused, never duplicated; metric points at steps already logged are
skipped (a retried trial re-reports the steps after its last checkpoint).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sftok import run_record as rr
from sftok.config import flatten, to_dict
from sftok.filelock import exclusive_lock
from sftok.storage import StorageError, StorageNotWritableError, check_writable, writing
from sftok_experiments import ROOT, protocol
from sftok_experiments.expand import stage_steps
from sftok_experiments.progress import StageProgress
from sftok_experiments.summary import (
    CampaignResult,
    clock,
    comparison_metric_keys,
    max_skipped,
    short_metrics,
)

# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


def open_store(tracking: str | None) -> tuple[Any, rr.Store]:
    """(MlflowClient, the store's location) for `--tracking-uri` (default ./mlruns), with the
    directories of a local store made and its schema created or migrated."""
    store = rr.store_location(tracking)
    if store.directory is not None:
        (store.directory / rr.ARTIFACTS).mkdir(parents=True, exist_ok=True)
    return client_for(store.uri), store


STORE_WHAT = "the MLflow store (--tracking-uri)"


def check_store_writable(store: rr.Store) -> None:
    """Refuse, in one line, a local store that cannot be written (`StorageNotWritableError`)
    before anything is computed or recorded: its directory, artifacts and database file."""
    if store.directory is None:  # a server: it says so itself
        return
    check_writable(store.directory, STORE_WHAT)
    if (store.directory / rr.ARTIFACTS).is_dir():
        check_writable(store.directory / rr.ARTIFACTS, STORE_WHAT)
    db = store.directory / rr.DB_FILE
    if db.exists() and not os.access(db, os.W_OK):
        raise StorageNotWritableError(db, STORE_WHAT, "the database file is read-only")


class StoreClient:
    """An MlflowClient on a local store whose calls meet a full disk (SQLite's "database or
    disk is full", ENOSPC copying an artifact) as `StorageFullError` naming the store, one
    line, instead of MLflow's error with its SQL. SQLite rolls a failed write back whole."""

    def __init__(self, client, directory: Path):
        self._client, self._directory = client, directory

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not the client's (and no recursion before __init__ ran)
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            with writing(self._directory, STORE_WHAT):
                return attr(*args, **kwargs)

        return call


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive file lock next to a SQLite store while its schema is created / migrated.

    MLflow creates and migrates the schema on first open; two campaigns opening a new store at
    once both ran the migration and one died (`table ... already exists`). Other stores (a
    server, a database that is not a file) serialise this themselves.
    """
    db = rr.sqlite_file(uri)
    if db is None:
        yield
        return
    with exclusive_lock(db.with_name(db.name + ".lock")):
        yield


def client_for(uri: str):
    """An MlflowClient whose store exists and is migrated (safe with concurrent campaigns)."""
    from mlflow.tracking import MlflowClient

    # SQLite schema migrations log at INFO on first use; keep the console for trial events.
    # A failed database write is logged at ERROR with its traceback (80 lines) before MLflow
    # raises it; the runner reports the exception itself, in one line.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    db = rr.sqlite_file(uri)
    with _store_lock(uri), (writing(db.parent, STORE_WHAT) if db else contextlib.nullcontext()):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # opens the store: creates / migrates it
    return StoreClient(client, db.parent) if db else client


def drop_artifacts(client, run_id: str) -> None:
    """Remove what a run's artifacts directory holds (a local store's; others are left):
    artifacts cut short by a full disk are not kept, the run logs them whole again."""
    uri = client.get_run(run_id).info.artifact_uri
    if uri.startswith("file:"):
        shutil.rmtree(unquote(urlparse(uri).path), ignore_errors=True)


def get_experiment(client, spec: str, artifact_root: str | None, reproduces: str = "") -> str:
    """The id of the spec's experiment, created (with its tags) if missing, restored if
    deleted."""
    from mlflow.exceptions import MlflowException

    name = rr.experiment_name(spec)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        loc = f"{artifact_root}/{name}" if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=loc,
                                            tags=rr.experiment_tags(spec, reproduces))
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # another campaign created it just now
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if rr.EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version of this runner
        client.set_experiment_tag(exp.experiment_id, rr.EXPERIMENT_KIND_TAG, rr.EXPERIMENT_KIND)
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


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100], synchronous=True)


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


# --------------------------------------------------------------------------------------------
# The parent run
# --------------------------------------------------------------------------------------------


def share_comparison(client, exp_id: str, parent_id: str, metric_keys: list[str]) -> None:
    """Write the experiment tag of a campaign's comparison view (`rr.comparison_view`)."""
    client.set_experiment_tag(exp_id, rr.comparison_view_tag(parent_id),
                              json.dumps(rr.comparison_view(parent_id, metric_keys)))


def find_campaign(client, campaign: str | None = None, experiment: str | None = None):
    """(experiment id, parent run) of a campaign: the parent run `campaign` (a run id or a
    campaign hash), else the latest parent run of `experiment` (a spec name), else the latest
    of the store; None when there is none."""
    exps = client.search_experiments()
    if experiment is not None:
        exps = [e for e in exps if e.name == rr.experiment_name(experiment)]
    ids = [e.experiment_id for e in exps]
    if not ids:
        return None
    if campaign is not None:
        with contextlib.suppress(Exception):  # not a run id: a campaign hash, below
            run = client.get_run(campaign)
            if rr.is_parent(run.data.tags) and run.info.experiment_id in ids:
                return run.info.experiment_id, run
    runs = client.search_runs(ids, filter_string=rr.parents_filter(campaign), max_results=1,
                              order_by=rr.NEWEST_FIRST)
    return (runs[0].info.experiment_id, runs[0]) if runs else None


def comparison_of(client, exp_id: str, parent) -> str:
    """Make sure the campaign's comparison view exists (a campaign recorded before views were
    written gets one from its children's metrics); returns its share key."""
    tag = rr.comparison_view_tag(parent.info.run_id)
    if tag not in client.get_experiment(exp_id).tags:
        children = rr.search_all(client, [exp_id], rr.children_filter(parent.info.run_id))
        keys = comparison_metric_keys([dict(r.data.metrics) for r in children])
        share_comparison(client, exp_id, parent.info.run_id, keys)
    return parent.info.run_id


def recent_parents(client, exp_id: str, n: int = 5) -> list:
    """The spec's latest parent runs (any campaign), newest first."""
    return client.search_runs([exp_id], filter_string=rr.parents_filter(), max_results=n,
                              order_by=rr.NEWEST_FIRST)


class ParentRun:
    """The parent run of one invocation: opened (or resumed), stage 0 logged on it, closed."""

    def __init__(self, client, exp_id: str, run_id: str, campaign_dir: Path, resumed: int = 0):
        self.client, self.exp_id, self.run_id = client, exp_id, run_id
        self.campaign_dir = campaign_dir
        self.resumed = resumed  # how many invocations continued it before this one

    @classmethod
    def open(cls, client, exp_id: str, plan, work_root: Path, echo=print) -> ParentRun:
        """A new parent run of `plan` (expand.Plan), its campaign dir under work_root."""
        spec = plan.spec
        commit, dirty = git_commit()
        tags = rr.parent_tags(
            spec=spec.name, preset=plan.preset, commit=commit, dirty=dirty,
            command=command_line(), campaign=plan.campaign_hash, reproduces=spec.reproduces,
            report=spec.report or "", spec_file=str(plan.spec_path), n_trials=len(plan.trials),
            overrides=" ".join(f"{k}={v}" for k, v in plan.cli_overrides.items()))
        run = client.create_run(exp_id, run_name=rr.parent_run_name(
            spec.name, plan.preset, time.strftime("%Y%m%d-%H%M%S")), tags=tags)
        parent = cls(client, exp_id, run.info.run_id, work_root / spec.name / run.info.run_id)
        set_tags(client, parent.run_id, {rr.CAMPAIGN_DIR_TAG: str(parent.campaign_dir)})
        try:
            client.log_artifact(parent.run_id, str(plan.spec_path))
            client.log_text(parent.run_id, json.dumps([t.to_payload() for t in plan.trials],
                                                      indent=1), rr.PLAN_JSON)
        except Exception as e:  # noqa: BLE001
            echo(f"warning: could not log the spec artifacts: {e}", flush=True)
        return parent

    @staticmethod
    def latest(client, exp_id: str, campaign: str):
        """The latest parent run of this campaign (same spec content, preset and trials), None
        when there is none. Reads only."""
        runs = client.search_runs([exp_id], filter_string=rr.parents_filter(campaign),
                                  max_results=1, order_by=rr.NEWEST_FIRST)
        return runs[0] if runs else None

    @staticmethod
    def campaign_dir_of(run, work_root: Path) -> Path:
        """Where a parent run's campaign directory is (its tag; a run recorded without one:
        `<work root>/<spec>/<run id>`, as `open` makes it)."""
        tagged = run.data.tags.get(rr.CAMPAIGN_DIR_TAG)
        return Path(tagged) if tagged else (
            work_root / run.data.tags.get(rr.SPEC_TAG, "unknown") / run.info.run_id)

    @classmethod
    def reopen(cls, client, exp_id: str, run, work_root: Path) -> tuple[ParentRun, dict]:
        """The parent run `run` (`latest`) reopened for one more invocation, with its children
        by trial key (the latest child of each)."""
        n = rr.resume_count(run.data.tags) + 1
        parent = cls(client, exp_id, run.info.run_id, cls.campaign_dir_of(run, work_root),
                     resumed=n)
        children = rr.search_all(client, [exp_id], rr.children_filter(parent.run_id),
                                 rr.OLDEST_FIRST)
        client.update_run(parent.run_id, status="RUNNING")
        set_tags(client, parent.run_id, rr.resume_tags(n, command_line()))
        # trial_key -> its latest child run
        return parent, {r.data.tags[rr.KEY_TAG]: r for r in children
                        if rr.KEY_TAG in r.data.tags}

    def log_teacher_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Stage 0 (the teacher, trained in the driver) on the parent run."""
        log_metrics(self.client, self.run_id, {rr.train_key("stage0", k): v
                                               for k, v in metrics.items()
                                               if isinstance(v, (int, float))}, step)

    def tag_teacher(self, i: int, key: str, info: dict | None) -> None:
        """The i-th distinct teacher of the campaign: its cache key (and what it is)."""
        set_tags(self.client, self.run_id, {rr.teacher_tag(i): key})
        if info is not None:
            with contextlib.suppress(Exception):  # informational
                self.client.log_text(self.run_id, json.dumps(info, indent=1),
                                     rr.teacher_info_path(key))

    def share_comparison(self, metric_keys: list[str]) -> None:
        """The MLflow UI's view comparing this campaign's arms (`rr.comparison_view`), an
        experiment tag that `python experiments/run.py ui` opens."""
        share_comparison(self.client, self.exp_id, self.run_id, metric_keys)

    def record_error(self, message: str) -> None:
        """Tag the invocation's error, if the store can take it (the console has it anyway:
        a full store must not hide the error it recorded)."""
        with contextlib.suppress(Exception):
            set_tags(self.client, self.run_id, {rr.ERROR_TAG: message[:5000]})

    def close(self, result: CampaignResult, table: str) -> None:
        """Counts, stage reuse, the summary table, and the final status of the invocation."""
        trials = result.trials
        set_tags(self.client, self.run_id, rr.closing_tags(
            n_finished=sum(t.status == "FINISHED" for t in trials),
            n_failed=sum(t.status == "FAILED" for t in trials), wall_s=result.wall_s,
            skipped=max_skipped(trials)))
        # step = the resume count, so a resumed campaign adds points instead of overwriting
        log_metrics(self.client, self.run_id, rr.stage_count_metrics(
            trained=result.stage_count("trained"), reused=result.stage_count("reused"),
            steps_trained=result.stage_count("trained", steps=True),
            steps_reused=result.stage_count("reused", steps=True)), self.resumed)
        with contextlib.suppress(Exception):
            self.client.log_text(self.run_id, table + "\n", rr.SUMMARY_TXT)
        measured = [t.metrics for t in trials if t.metrics]
        if measured:  # the columns the trials did report (rFID only where it was computed)
            self.share_comparison(comparison_metric_keys(measured))
        # Interrupted (Ctrl-C, between or during trials): KILLED, not FAILED — nothing went
        # wrong that --resume would not continue; the failures of single trials stay on their
        # runs.
        interrupted = result.interrupted
        if interrupted:
            set_tags(self.client, self.run_id, {rr.INTERRUPTED_TAG: "true"})
        status = "FINISHED" if result.ok else (
            "KILLED" if interrupted and not result.setup_error else "FAILED")
        self.client.set_terminated(self.run_id, status=status)


# --------------------------------------------------------------------------------------------
# The child runs: a tune.Callback
# --------------------------------------------------------------------------------------------


class TrialRecord:
    def __init__(self, key: str, arm: str, seed: int, run_id: str | None = None):
        self.key, self.arm, self.seed, self.run_id = key, arm, seed, run_id
        self.status = "PENDING"
        self.metrics: dict[str, float] = {}  # eval/* as logged
        self.error: str | None = None
        self.last_step: dict[str, int] = {}  # metric key -> last logged step
        self.got_final = False
        self.started = None
        self.seconds = 0.0
        self.retries = 0
        self.stage_sources: dict[str, tuple[str, str, int]] = {}  # stage -> (source, key, steps)
        self.skipped: dict[str, int] = {}  # "train" (max over stages) / "val": bad image files
        self.progress = None  # progress.StageProgress, made on the first live train report


def _recording(hook):
    """A tracker hook whose store writes may fail. The first storage fault (a full or
    read-only store) is kept as `store_fault`, which stops the campaign (`stopper`); the hook's
    trial stays unfinished in the store, so --resume runs it again, and Ray neither fails nor
    retries the trial for what was the driver's fault."""
    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except StorageError as e:
            self.store_fault = self.store_fault or e
            return None

    return wrapper


def console(*args, **kwargs) -> None:
    """`print`, as a function that pickles by reference (`MlflowTracker`'s default echo)."""
    print(*args, **kwargs)


def _make_tracker_class():
    from ray import tune

    class StopOnStoreFault(tune.Stopper):
        """Ends the Tune run (every trial) once the tracker met a storage fault."""

        def __init__(self, tracker):
            self.tracker = tracker

        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return self.tracker.store_fault is not None

    class MlflowTracker(tune.Callback):
        """Creates a child run per trial and logs params/tags/metrics/artifacts (driver only).
        A full or read-only store stops the campaign (`store_fault`, `stopper`)."""

        def __init__(self, client, experiment_id: str, parent_id: str, spec_name: str,
                     preset: str, existing: dict[str, Any] | None = None,
                     echo=None, progress_every: float = 30.0):
            self.client = client
            self.exp_id = experiment_id
            self.parent_id = parent_id
            self.spec_name = spec_name
            self.preset = preset
            self.existing = dict(existing or {})  # key -> MLflow run (from an earlier invocation)
            self.records: dict[str, TrialRecord] = {}  # by ray trial id
            # Not `print` as the default: Ray pickles this class by value (tuner.pkl), defaults
            # included, and a builtin pickles by name, which fails once Ray's log thread has
            # patched `builtins.print` (ray.experimental.tqdm_ray), i.e. at random.
            self.echo = echo or console
            self.progress_every = progress_every  # seconds between progress lines of a trial
            self.store_fault: StorageError | None = None  # the store failed: stop

        def stopper(self) -> tune.Stopper:
            """The Tune stopper that ends the run once the store failed."""
            return StopOnStoreFault(self)

        # Ray pickles the run config (tuner.pkl, for Tuner.restore); the store client and the
        # console are driver-only and are not part of that state.
        def __getstate__(self):
            state = dict(self.__dict__)
            state["client"] = None
            state["echo"] = None
            return state

        # -- helpers -------------------------------------------------------------------------
        def _record(self, trial) -> TrialRecord:
            rec = self.records.get(trial.trial_id)
            if rec is None:
                rec = TrialRecord(protocol.trial_key(trial.config, trial.trial_id),
                                  protocol.trial_arm(trial.config),
                                  protocol.payload(trial.config)["seed"])
                self.records[trial.trial_id] = rec
            return rec

        def _run_of(self, trial) -> TrialRecord:
            """The trial's record, its child run opened (an event may come before the start)."""
            rec = self._record(trial)
            if rec.run_id is None:
                self._open_run(trial, rec)
            return rec

        def _ended(self, trial) -> TrialRecord:
            rec = self._run_of(trial)
            rec.seconds = time.time() - (rec.started or time.time())
            return rec

        def _line(self, rec: TrialRecord, what: str) -> None:
            self.echo(f"[{clock()}] trial {rec.key:<24} {what}", flush=True)

        def _open_run(self, trial, rec: TrialRecord) -> None:
            payload = protocol.payload(trial.config)
            prev = self.existing.get(rec.key)
            if prev is not None:  # resumed: reuse the child, drop points already logged
                rec.run_id = prev.info.run_id
                self.client.update_run(rec.run_id, status="RUNNING")
                if rr.ERROR_TAG in prev.data.tags:  # the earlier attempt's error is gone
                    self.client.delete_tag(rec.run_id, rr.ERROR_TAG)
                for k in prev.data.metrics:  # train curves, eval results, trace steps
                    hist = self.client.get_metric_history(rec.run_id, k)
                    if hist:
                        rec.last_step[k] = max(m.step for m in hist)
                set_tags(self.client, rec.run_id, {rr.RAY_TRIAL_TAG: trial.trial_id,
                                                   rr.RESUMED_TAG: "true"})
                return
            tags = rr.trial_tags(parent_id=self.parent_id, arm=rec.arm, seed=rec.seed,
                                 key=rec.key, spec=self.spec_name, preset=self.preset,
                                 ray_trial_id=trial.trial_id, stages=payload["stages"],
                                 arm_values=payload.get("arm_values") or {},
                                 search_values=protocol.search_values(trial.config))
            run = self.client.create_run(self.exp_id, run_name=rec.key, tags=tags)
            rec.run_id = run.info.run_id
            cfg = protocol.resolved_config(trial.config)
            log_params(self.client, rec.run_id,
                       rr.trial_params(flatten(to_dict(cfg)), payload["stages"], rec.arm))

        # -- Ray Tune hooks ------------------------------------------------------------------
        @_recording
        def on_trial_start(self, iteration, trials, trial, **info):
            rec = self._run_of(trial)
            rec.status = "RUNNING"
            rec.started = rec.started or time.time()
            self._line(rec, f"started   arm={rec.arm} seed={rec.seed} run={rec.run_id[:8]}")

        @_recording
        def on_trial_recover(self, iteration, trials, trial, **info):
            rec = self._record(trial)
            rec.retries += 1
            self._line(rec, f"crashed, retrying from its last checkpoint "
                            f"(retry {rec.retries}): {rec.error or _error_summary(trial)}")
            rec.error = None  # the next attempt reports its own
            rec.progress = None  # and its own speed

        @_recording
        def on_trial_result(self, iteration, trials, trial, result, **info):
            rec = self._run_of(trial)
            report = protocol.decode(result)
            if report.tags:  # where and when the trial ran (sftok_experiments.placement)
                set_tags(self.client, rec.run_id, report.tags)
            if report.event == protocol.TRAIN:
                self._train(trial, rec, report)
            elif report.event == protocol.STAGE_DONE:
                stage, source = report.stage, report.source
                if source and stage not in rec.stage_sources:  # a retry re-reports: keep 1st
                    rec.stage_sources[stage] = (source, report.key, report.steps)
                    set_tags(self.client, rec.run_id, rr.stage_tags(stage, source, report.key))
                how = f", {source} {report.key}" if source else ""
                self._line(rec, f"{stage} done (global step {report.step}{how})")
            elif report.event == protocol.ERROR:  # sent by protocol.guarded before it fails
                rec.error = report.error
                if not report.retry:
                    # Deterministic (a non-finite loss, a bad config value): a retry would
                    # fail the same way. Ray's FailureConfig cannot tell error kinds apart;
                    # with no retries left for this trial its failure is final.
                    trial.max_failures = 0
            elif report.event == protocol.FINAL:
                m = {rr.eval_key(k): v for k, v in report.metrics.items()}
                self._log_new(rec, m, 0)
                rec.metrics.update(m)
                rec.got_final = True
                if "skipped_images" in report.metrics:
                    rec.skipped["val"] = int(report.metrics["skipped_images"])

        def _log_new(self, rec: TrialRecord, metrics: dict[str, float], step: int) -> None:
            """Log the points after those the run has (a retried or resumed trial reports
            again what it reported before its last checkpoint, or before the store failed)."""
            new = {k: v for k, v in metrics.items() if step > rec.last_step.get(k, -1)}
            for k in new:
                rec.last_step[k] = step
            if new:
                log_metrics(self.client, rec.run_id, new, step)

        def _train(self, trial, rec: TrialRecord, report: protocol.Report) -> None:
            self._log_new(rec, {rr.train_key(report.stage, k): v
                                for k, v in report.metrics.items()}, report.step)
            if "data_skipped" in report.metrics:
                rec.skipped["train"] = max(rec.skipped.get("train", 0),
                                           int(report.metrics["data_skipped"]))
            if not report.replayed:  # a reused stage shows its reuse line, not its old curve
                self._progress(trial, rec, report)

        def _progress(self, trial, rec: TrialRecord, report: protocol.Report) -> None:
            if rec.progress is None:
                stages = list(protocol.payload(trial.config)["stages"])
                cfg = protocol.resolved_config(trial.config)
                rec.progress = StageProgress(stages, {s: stage_steps(cfg, s) for s in stages},
                                             self.progress_every)
            line = rec.progress.update(report.stage, report.step, report.metrics)
            if line:
                self._line(rec, line)

        @_recording
        def on_trial_complete(self, iteration, trials, trial, **info):
            rec = self._ended(trial)
            if not rec.got_final:
                # Stopped before its final report (e.g. the campaign was interrupted).
                rec.status = "KILLED"
                self.client.set_terminated(rec.run_id, status="KILLED")
                self._line(rec, "stopped before finishing (resume with --resume)")
                return
            try:
                self._log_artifacts(trial, rec)
            except StorageError:
                # A full (or read-only) store: the run stays unfinished, so that --resume
                # runs the trial again and logs its artifacts whole; none cut short are kept.
                with contextlib.suppress(Exception):
                    drop_artifacts(self.client, rec.run_id)
                raise
            except Exception as e:  # noqa: BLE001 — a logging problem must not hide the result
                self._line(rec, f"warning: could not log artifacts: {e}")
                set_tags(self.client, rec.run_id, {rr.ARTIFACT_ERROR_TAG: str(e)})
            rec.status = "FINISHED"
            self.client.set_terminated(rec.run_id, status="FINISHED")
            self._line(rec, f"finished in {rec.seconds:.0f}s  " + short_metrics(rec.metrics))

        @_recording
        def on_trial_error(self, iteration, trials, trial, **info):
            rec = self._ended(trial)
            text = _error_text(trial)
            rec.error = rec.error or _error_summary(trial)
            rec.status = "FAILED"
            set_tags(self.client, rec.run_id, {rr.ERROR_TAG: rec.error})
            with contextlib.suppress(Exception):
                self.client.log_text(rec.run_id, text, rr.ERROR_TXT)
            self.client.set_terminated(rec.run_id, status="FAILED")
            self._line(rec, f"FAILED: {rec.error} (traceback: {rr.ERROR_TXT} of run "
                            f"{rec.run_id[:8]})")

        def close_unfinished(self) -> None:
            """Close the children still running (the driver was interrupted) as KILLED."""
            for rec in self.records.values():
                if rec.status in ("RUNNING", "PENDING") and rec.run_id:
                    rec.status = "KILLED"  # in the summary even if the store cannot take it
                    self.client.set_terminated(rec.run_id, status="KILLED")

        # -- artifacts -----------------------------------------------------------------------
        def _log_artifacts(self, trial, rec: TrialRecord) -> None:
            with protocol.final_artifacts(trial) as d:
                if d is None:
                    return
                for name in rr.TRIAL_FILES:
                    if (d / name).exists():
                        self.client.log_artifact(rec.run_id, str(d / name))
                for sub in rr.TRIAL_DIRS:
                    if (d / sub).is_dir():
                        self.client.log_artifacts(rec.run_id, str(d / sub), sub)
                if (d / rr.TRACE_CSV).exists():
                    for step, values in rr.trace_metrics(rr.read_csv(d / rr.TRACE_CSV)).items():
                        self._log_new(rec, values, step)
                unavailable = rr.read_unavailable(d)
                if unavailable:
                    set_tags(self.client, rec.run_id, rr.unavailable_tags(unavailable))

    return MlflowTracker


def MlflowTracker(*args, **kwargs):
    return _make_tracker_class()(*args, **kwargs)


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
