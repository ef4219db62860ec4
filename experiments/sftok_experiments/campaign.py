"""One invocation of a spec: MLflow parent run, stage-0 teacher, Ray Tune trials, summary.

    plan = expand(spec, path, preset=..., seeds=..., sets=...)      # validated, no compute yet
    result = run_campaign(plan, Options(resume=True))
    sys.exit(result.exit_code)

Resume (`Options.resume`): the latest parent run of the same campaign (tag `sftok.campaign`,
a hash of the spec content, preset and resolved trials) is reused; trials whose child run is
FINISHED are skipped; the others reuse their child run and their work directory
(`<campaign dir>/trials/<key>/<stage>/`), where `train_stage` continues from its last periodic
checkpoint. So nothing finished is re-run and no child run is duplicated. (A fresh Tuner per
invocation, rather than `Tuner.restore`, keeps this independent of Ray's experiment state files
and of pickled callbacks.)
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftok import run_record as rr
from sftok.filelock import LockHeldError, announced_lock
from sftok.storage import (
    StorageError,
    StorageFullError,
    check_writable,
    disk_full,
    storage_error_in,
    writing,
)
from sftok_experiments import EXPERIMENTS_DIR, ROOT, protocol
from sftok_experiments import tracking as trk
from sftok_experiments.expand import Plan, check_workers, reported_metrics
from sftok_experiments.placement import (
    concurrent_trials,
    resource_shortfall,
    trial_resources,
    worker_request_error,
)
from sftok_experiments.spec import SpecError
from sftok_experiments.summary import (
    CampaignResult,
    TrialSummary,
    clock,
    comparison_metric_keys,
    summary_table,
)

DRIVER_LOCK = "driver.lock"  # <campaign dir>/driver.lock: who runs the campaign now


@dataclass
class Options:
    tracking: str | None = None  # store dir or URI; default ./mlruns
    ray_address: str | None = None  # attach to an existing Ray cluster
    cpus_per_trial: float = 1.0  # of each worker when workers_per_trial > 1
    gpus_per_trial: float = 0.0  # of each worker when workers_per_trial > 1
    workers_per_trial: int | None = None  # W data-parallel workers per trial; None: the spec's
    ray_train: bool = False  # through Ray Train even at W = 1 (the device check's NCCL run)
    device: str | None = None  # trials' device; None: the config's ("auto"); see placement.py
    max_concurrent: int | None = None
    resume: bool = False
    work_dir: str | None = None  # campaign dirs (trial work dirs, Ray storage); default ./runs
    cache_dir: str | None = None  # teacher cache etc.; default ./.cache
    max_failures: int | None = None  # default: the spec's
    trial_fn: Callable[[dict], None] | None = None  # default: trial.run_trial
    prepare_teacher: bool = True  # stage 0 in the driver before the trials
    share_stages: bool = True  # one copy of each distinct stage result per work dir
    progress_every: float = 30.0  # seconds between progress lines of a trial (< 0: none)
    resume_hint: str | None = None  # the command that continues this invocation (cli.py)
    echo: Callable[..., None] = print


def work_root(opts: Options) -> Path:
    """Where campaign directories go: --work-dir, default ./runs of the checkout."""
    return Path(opts.work_dir).expanduser().resolve() if opts.work_dir else ROOT / "runs"


def cache_root(opts: Options) -> Path:
    """The teacher / FID-statistics cache: --cache-dir, default ./.cache of the checkout."""
    return Path(opts.cache_dir).expanduser().resolve() if opts.cache_dir else ROOT / ".cache"


def workers_per_trial(plan: Plan, opts: Options) -> int:
    """W: --workers-per-trial, else the spec's `workers_per_trial`."""
    return (plan.spec.workers_per_trial if opts.workers_per_trial is None
            else opts.workers_per_trial)


def uses_ray_train(plan: Plan, opts: Options) -> bool:
    """Whether the trials train on Ray Train workers: W > 1, or asked for (`--ray-train`)."""
    return opts.ray_train or workers_per_trial(plan, opts) > 1


def check_request(plan: Plan, opts: Options) -> str | None:
    """The one-line error for a request no trial could run with (W does not divide a stage's
    accumulation, a fractional GPU per worker), else None. Pure: before any compute."""
    workers = workers_per_trial(plan, opts)
    try:
        check_workers(plan, workers)
    except SpecError as e:
        return str(e)
    return worker_request_error(workers, opts.gpus_per_trial)


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


def _pythonpath() -> str:
    parts = [str(EXPERIMENTS_DIR), str(ROOT)]
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join(parts + ([old] if old else []))


# Forwarded to the workers when set: on other nodes the raylet's environment lacks them.
FORWARDED_ENV = ("SFTOK_INCEPTION_WEIGHTS", "SFTOK_LPIPS_WEIGHTS", "SFTOK_DINO_WEIGHTS",
                 "TORCH_HOME", "HF_HOME")


# Run by every Ray worker process as it starts: Ray internals' per-report log lines off.
WORKER_SETUP_HOOK = "sftok_experiments.protocol.quiet_ray_worker"


def _forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def init_ray(address: str | None = None, num_cpus: int | None = None,
             num_gpus: int | None = None,
             worker_setup: str | Callable[[], None] = WORKER_SETUP_HOOK) -> bool:
    """Start (or attach to) Ray so workers can import this package; True if we started it.

    num_gpus None: Ray counts the machine's GPUs; a number declares logical GPUs (tests
    schedule on them without CUDA, tests/test_gpu_scheduling.py). worker_setup: what every
    Ray worker process runs first (default `protocol.quiet_ray_worker`; tests inject faults
    into the workers of data-parallel trials with it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ["PYTHONPATH"] = _pythonpath()  # local workers inherit it from the raylet
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"],
                                                "SFTOK_PROGRESS": "0", **_forwarded_env()},
                                   "worker_process_setup_hook": worker_setup}
    if address:
        # Other nodes may not have this checkout: ship the orchestration package with the job.
        runtime_env = {"py_modules": [str(EXPERIMENTS_DIR / "sftok_experiments")],
                       "env_vars": {"SFTOK_PROGRESS": "0", **_forwarded_env()},
                       "worker_process_setup_hook": worker_setup}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True,
                 logging_level="WARNING")
    else:
        # Ray enables token authentication for a new local cluster and warns that it did (an
        # opt-out notice, nothing to act on): keep the protection, drop the notice.
        import logging

        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, num_gpus=num_gpus,
                 include_dashboard=False,
                 object_store_memory=200 * 1024 ** 2, runtime_env=runtime_env,
                 logging_level="WARNING", log_to_driver=True)
    return True


def _optuna_searcher(search: dict, points: list[dict], rewards: list[float]):
    from ray.tune.search.optuna import OptunaSearch

    class FinalMetricOptuna(OptunaSearch):
        """Training reports carry train/* only; tell Optuna the final eval metric alone."""

        def on_trial_result(self, trial_id, result):
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    kwargs: dict[str, Any] = {"metric": search["metric"], "mode": search["mode"]}
    if points:
        kwargs.update(points_to_evaluate=points, evaluated_rewards=rewards)
    return FinalMetricOptuna(**kwargs)


def _search_space(search: dict) -> dict:
    from ray import tune

    space = {}
    for k, dist in search["space"].items():
        kind, v = next((kk, vv) for kk, vv in dist.items() if vv is not None)
        space[k] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                    "randint": lambda a: tune.randint(*a), "choice": tune.choice}[kind](v)
    return space


# --------------------------------------------------------------------------------------------
# The campaign
# --------------------------------------------------------------------------------------------


def _prepare_floors(todo: list, eval_cache: Path) -> None:
    """Fit the floors' palettes once per data set in the driver (cached under eval_cache):
    trials that start together would otherwise each fit the same k-means before the cache
    exists. Generation trials score no floors (Table 2), so they need none."""
    from sftok.evaluate.bounds import floor_codecs, floors_key

    seen = set()
    for t in todo:
        key = floors_key(t.config)
        if "generation" not in t.stages and key not in seen:
            seen.add(key)
            floor_codecs(t.config, eval_cache)


def _prepare_teachers(todo: list, cache: Path, parent: trk.ParentRun, echo) -> None:
    """Stage 0 once per campaign (per distinct teacher), in the driver, before the trials."""
    from sftok.released import read_manifest
    from sftok.train import get_teacher, teacher_info
    from sftok.train.teacher_stage import teacher_identity, teacher_published

    seen = set()
    for t in todo:
        key = teacher_identity(t.config)
        if key in seen:
            continue
        seen.add(key)
        t0 = time.time()
        tcfg = t.config.teacher
        where = {"train": f"(stage 0) {key}: preparing under {cache}",
                 "shipped": f"{tcfg.shipped!r} shipped with sftok ({key}): loading",
                 "pretrained": f"{key}: loading {tcfg.weights or tcfg.hf_filename}"}
        echo(f"[{clock()}] teacher {where[tcfg.source]}", flush=True)

        total = t.config.train.teacher.steps
        last_echo = [time.time()]

        def cb(step: int, metrics: dict[str, float], total: int = total,
               last_echo: list = last_echo) -> None:
            parent.log_teacher_metrics(step, metrics)
            # A console line every ~30 s (and at the end) while the driver trains stage 0.
            if "loss" in metrics and (time.time() - last_echo[0] > 30 or step >= total):
                last_echo[0] = time.time()
                shown = "  ".join(f"{k}={metrics[k]:.4g}" for k in ("loss", "psnr")
                                  if k in metrics)
                echo(f"[{clock()}] teacher step {step}/{total}  {shown}", flush=True)

        get_teacher(t.config, cache, callback=cb)
        echo(f"[{clock()}] teacher ready in {time.time() - t0:.1f}s", flush=True)
        info = None
        with contextlib.suppress(Exception):  # informational
            if tcfg.source == "train" and teacher_published(cache / key):
                info = teacher_info(cache / key)
            elif tcfg.source == "shipped":
                info = read_manifest(tcfg.shipped)  # config, command, curve, sha256
        parent.tag_teacher(len(seen) - 1, key, info)


def run_campaign(plan: Plan, opts: Options | None = None) -> CampaignResult:
    """One invocation of `plan` (module docstring). Refused in one line, before anything is
    computed or recorded, when the work dir, the cache dir or the store cannot be written, and
    when another process is running the same campaign (its parent run is held by one
    invocation at a time: `--resume` twice at once, one proceeds)."""
    opts = opts or Options()
    echo = opts.echo
    t_start = time.time()
    store = rr.store_location(opts.tracking)

    def refused(error: str, exp_id: str = "", usage: bool = False) -> CampaignResult:
        echo(f"error: {error}", file=sys.stderr, flush=True)
        why = {"usage_error": error} if usage else {"setup_error": error}
        return CampaignResult("", exp_id, store.uri, Path(), [], time.time() - t_start, **why)

    bad_request = check_request(plan, opts)  # W, GPUs per worker: before anything else
    if bad_request:
        return refused(bad_request, usage=True)
    exp_id = ""
    try:  # before anything is computed or recorded
        check_writable(work_root(opts), "the work dir (--work-dir)")
        check_writable(cache_root(opts), "the cache dir (--cache-dir)")
        trk.check_store_writable(store)
        client, store = trk.open_store(opts.tracking)
        exp_id = trk.get_experiment(client, plan.spec.name, store.artifact_root,
                                    plan.spec.reproduces)
        plan, earlier = _earlier_invocation(client, exp_id, plan, opts.resume, echo)
    except StorageError as e:  # e.g. a full store: nothing can be recorded
        return refused(protocol.one_line(e), exp_id)
    if opts.resume and earlier is None:
        # A silent fresh start would redo hours of finished trials when e.g. one --set differs:
        # stop, and show what the earlier invocations were run with.
        msg = (f"--resume: no earlier invocation of this campaign ({plan.campaign_hash}: same "
               f"spec content, preset, seeds and --set/--data) in {store.uri}")
        recent = trk.recent_parents(client, exp_id)
        lines = [f"  {r.info.run_id}  {_start(r)}  {r.data.tags.get(rr.COMMAND_TAG, '?')}"
                 for r in recent]
        echo(msg + (f";\nrecent runs of spec {plan.spec.name}:\n" + "\n".join(lines) if lines
                    else f"; spec {plan.spec.name} has no earlier runs there"),
             file=sys.stderr, flush=True)
        return CampaignResult("", exp_id, store.uri, Path(), [], time.time() - t_start,
                              usage_error=msg)
    parent_id = earlier.info.run_id if earlier is not None else ""
    try:
        with contextlib.ExitStack() as held:
            if earlier is not None:  # held before the parent run is touched
                held.enter_context(_held(trk.ParentRun.campaign_dir_of(earlier,
                                                                       work_root(opts))))
                parent, existing = trk.ParentRun.reopen(client, exp_id, earlier,
                                                        work_root(opts))
                n_done = sum(r.info.status == "FINISHED" for r in existing.values())
                echo(f"resuming parent run {parent.run_id} ({n_done} of {len(existing)} "
                     "recorded trials finished)", flush=True)
            else:
                parent, existing = trk.ParentRun.open(client, exp_id, plan, work_root(opts),
                                                      echo), {}
                parent_id = parent.run_id
                held.enter_context(_held(parent.campaign_dir))
            return _invocation(plan, opts, client, store.uri, exp_id, parent, existing,
                               t_start)
    except LockHeldError as e:
        return refused(f"campaign {plan.campaign_hash} (parent run {parent_id}) is being run by "
                       f"{e.holder or 'another process'}; this invocation changed nothing — "
                       "wait for that one to end (or stop it), then --resume", exp_id,
                       usage=True)
    except StorageError as e:  # opening the parent run met a full or read-only store
        return refused(protocol.one_line(e), exp_id)


def _held(campaign_dir: Path):
    """The campaign's driver lock: one invocation at a time runs a parent run (a second one
    gets `LockHeldError` naming the first's pid, host, start and command line)."""
    with writing(campaign_dir, "the campaign's driver lock"):
        campaign_dir.mkdir(parents=True, exist_ok=True)
    return announced_lock(campaign_dir / DRIVER_LOCK, wait=False, note=trk.command_line())


def _earlier_invocation(client, exp_id: str, plan: Plan, resume: bool, echo
                        ) -> tuple[Plan, Any]:
    """(plan, the latest parent run of its campaign) to continue with --resume; (plan, None)
    without --resume or when there is none. Reads only."""
    if not resume:
        return plan, None
    run = trk.ParentRun.latest(client, exp_id, plan.campaign_hash)
    legacy = plan.with_legacy_labels() if run is None else None
    if legacy is not None:
        # A store written before arm labels printed floats as written (lr=3e-05, once
        # lr=3.0000000000000004e-05): its campaign and child runs carry the old labels. Keep
        # them for this campaign, so that its finished trials match and none runs twice.
        run = trk.ParentRun.latest(client, exp_id, legacy.campaign_hash)
        if run is not None:
            old = next(t for t in legacy.trials if t.key not in {x.key for x in plan.trials})
            echo(f"resuming a campaign recorded with the older arm labels (e.g. {old.arm}): "
                 "keeping them, so its finished trials match", flush=True)
            return legacy, run
    return plan, run


def _invocation(plan: Plan, opts: Options, client, uri: str, exp_id: str,
                parent: trk.ParentRun, existing: dict[str, Any], t_start: float
                ) -> CampaignResult:
    """The invocation once its parent run is open and held: stage 0, floors, the trials on
    Ray, the summary, the parent closed. A full store stops it in one line; --resume
    continues."""
    spec, echo = plan.spec, opts.echo
    parent_id, campaign_dir = parent.run_id, parent.campaign_dir
    # The UI's first screen compares the arms from the start (columns as the trials will
    # report them; the parent's closing rewrites them with those the trials did report).
    parent.share_comparison(comparison_metric_keys(
        [dict.fromkeys(reported_metrics(plan.trials[0].config), 0.0)]))
    campaign_dir.mkdir(parents=True, exist_ok=True)
    echo(f"MLflow: {uri} — experiment '{spec.name}', parent run {parent_id}", flush=True)

    finished = {k: r for k, r in existing.items() if r.info.status == "FINISHED"}
    summaries: dict[str, TrialSummary] = {}
    search = plan.search
    if search:
        todo = plan.trials
        remaining = max(0, search["num_samples"] - len(finished))
        for k, r in finished.items():
            summaries[k] = _summary_from_run(k, r, "finished earlier")
    else:
        todo = [t for t in plan.trials if t.key not in finished]
        remaining = len(todo)
        for t in plan.trials:
            if t.key in finished:
                summaries[t.key] = _summary_from_run(t.key, finished[t.key], "finished earlier")
    if finished:
        echo(f"skipping {len(finished)} finished trial(s): {', '.join(sorted(finished))}",
             flush=True)

    cache = cache_root(opts)
    interrupted = False
    tracker = None
    started_ray = False
    setup_error = None
    try:
        if remaining:
            # Ray first: a request that this machine can never satisfy stops the campaign here,
            # before stage 0, rather than leaving the trials pending forever.
            started_ray = init_ray(opts.ray_address)
            setup_error = None if opts.ray_address else _local_shortfall(plan, opts)
            if setup_error:
                echo(f"error: {setup_error}", file=sys.stderr, flush=True)
                parent.record_error(setup_error)
        if remaining and opts.prepare_teacher and setup_error is None:
            import torch

            torch.set_num_threads(max(1, os.cpu_count() or 1))
            try:
                _prepare_teachers(todo, cache / "teachers", parent, echo)
                _prepare_floors(todo, cache / "eval")
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 — reported, recorded, exit non-zero
                setup_error = protocol.one_line(e)
                echo(f"error: preparing the trials (stage 0 teacher, floors) failed, no trial "
                     f"started: {setup_error}", file=sys.stderr, flush=True)
                parent.record_error(setup_error)
        if remaining and setup_error is None:
            # Made here so that what it recorded survives a Ctrl-C inside fit().
            tracker = trk.MlflowTracker(client, exp_id, parent_id, spec.name, plan.preset,
                                        existing={k: r for k, r in existing.items()
                                                  if r.info.status != "FINISHED"},
                                        echo=echo, progress_every=opts.progress_every)
            _run_tuner(plan, opts, todo, remaining, finished, tracker, campaign_dir, cache,
                       echo)
            if tracker.store_fault is not None:  # the store failed: Tune stopped the trials
                raise tracker.store_fault
    except KeyboardInterrupt:
        interrupted = True
        echo(f"[{clock()}] interrupted: closing the runs (the command that continues is "
             "printed at the end)", flush=True)
    except Exception as e:  # noqa: BLE001 — the driver itself failed: record it, exit non-zero
        import traceback

        # A full or read-only store (the tracker's writes, under Ray's TuneError), or a full
        # work dir (e.g. Ray's experiment state there): one line.
        fault = storage_error_in(e) or (
            StorageFullError(campaign_dir, "the campaign's Ray state", "")
            if disk_full(e, campaign_dir) else None)
        if fault is not None:
            e = fault
            echo(f"error: {protocol.one_line(e)}", file=sys.stderr, flush=True)
        else:
            echo(traceback.format_exc(), file=sys.stderr, flush=True)
        setup_error = protocol.one_line(e)
        parent.record_error(setup_error)
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    store_fault = None  # the store failed while the runs were being closed
    if tracker is not None:
        try:
            tracker.close_unfinished()  # children still running: the driver was interrupted
        except StorageError as e:
            store_fault = e
        for rec in tracker.records.values():
            summaries[rec.key] = TrialSummary(rec.key, rec.arm, rec.seed, rec.status,
                                              dict(rec.metrics), rec.error, rec.seconds,
                                              rec.run_id, skipped=dict(rec.skipped),
                                              stage_sources=dict(rec.stage_sources))
    for t in plan.trials if not search else []:
        summaries.setdefault(t.key, TrialSummary(t.key, t.arm, t.seed, "NOT RUN"))
    interrupted = interrupted or any(s.status == "KILLED" for s in summaries.values())
    order = {t.key: i for i, t in enumerate(plan.trials)}
    trials = sorted(summaries.values(), key=lambda s: (order.get(s.key, len(order)), s.key))
    result = CampaignResult(parent_id, exp_id, uri, campaign_dir, trials, time.time() - t_start,
                            interrupted, setup_error)
    table = summary_table(result)
    echo(table, flush=True)
    if store_fault is None:
        try:
            parent.close(result, table)
        except StorageError as e:
            store_fault = e
    if store_fault is not None:  # the runs stay open in the store; --resume closes them
        if protocol.one_line(store_fault) != setup_error:
            echo(f"error: {protocol.one_line(store_fault)}", file=sys.stderr, flush=True)
        result.setup_error = result.setup_error or protocol.one_line(store_fault)
    if not result.ok:
        bad = [t for t in trials if t.status != "FINISHED"]
        echo(f"{len(bad)} of {len(trials)} trial(s) did not finish:\n"
             + "\n".join(f"  {t.key}: {t.status}{' — ' + t.error if t.error else ''}"
                         for t in bad), file=sys.stderr, flush=True)
        # --resume continues whatever did not finish (a Ctrl-C, a full disk, a failure).
        hint = opts.resume_hint or (
            f"python experiments/run.py {plan.spec_path} --tracking-uri {uri} --work-dir "
            f"{work_root(opts)} --cache-dir {cache_root(opts)} --resume (and the same "
            "--preset/--seeds/--set/--data)")
        echo(f"continue with: {hint}", file=sys.stderr, flush=True)
    return result


def _local_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the local Ray."""
    import ray

    have = ray.cluster_resources()
    return have.get("CPU", 0.0), have.get("GPU", 0.0)


def _local_shortfall(plan: Plan, opts: Options) -> str | None:
    """A local Ray too small for one trial (W workers' CPUs and GPUs): the one-line error, else
    None. (An attached cluster may autoscale, so it is left to Ray's own messages.)"""
    return resource_shortfall(workers_per_trial(plan, opts), opts.cpus_per_trial,
                              opts.gpus_per_trial, *_local_resources())


def _max_concurrent(plan: Plan, opts: Options) -> int | None:
    """--max-concurrent; with W > 1 on a local Ray at most the trials whose workers all fit at
    once (a Ray Train run starts only when all its workers fit: more trial processes would
    only wait)."""
    workers = workers_per_trial(plan, opts)
    if not uses_ray_train(plan, opts) or opts.ray_address:
        return opts.max_concurrent
    fit = concurrent_trials(workers, opts.cpus_per_trial, opts.gpus_per_trial,
                            *_local_resources())
    return min(fit, opts.max_concurrent or fit)


def _run_tuner(plan, opts, todo, remaining, finished, tracker, campaign_dir, cache, echo):
    from ray import tune

    from sftok_experiments.trial import run_trial

    spec = plan.spec
    cpus, gpus = float(opts.cpus_per_trial), float(opts.gpus_per_trial)
    workers, ray_train = workers_per_trial(plan, opts), uses_ray_train(plan, opts)
    max_concurrent = _max_concurrent(plan, opts)
    # The stage store sits beside the campaign dirs (<work dir>/stages, campaign_dir is
    # <work dir>/<spec>/<parent run>), so campaigns sharing a work dir share stage results.
    runtime = protocol.Runtime(
        work_root=str(campaign_dir / "trials"), stage_store=str(campaign_dir.parent.parent /
                                                                "stages"),
        share_stages=bool(opts.share_stages), teacher_cache=str(cache / "teachers"),
        eval_cache=str(cache / "eval"), cpus=max(1, math.ceil(cpus)), cpu_share=cpus,
        gpus=gpus, device=opts.device, workers=workers,
        ray_train=ray_train)  # placement.py, data_parallel.py
    trainable = tune.with_resources(protocol.guarded(opts.trial_fn or run_trial),
                                    trial_resources(ray_train, cpus, gpus))
    if plan.search:
        search = plan.search
        points, rewards = warm_start(search, finished)
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # train reports lack the metric
        param_space = protocol.trial_config(todo[0].to_payload(), runtime,
                                            _search_space(search))
        tune_config = tune.TuneConfig(search_alg=_optuna_searcher(search, points, rewards),
                                      num_samples=remaining,
                                      max_concurrent_trials=max_concurrent,
                                      trial_dirname_creator=lambda t: protocol.trial_key(
                                          t.config, t.trial_id))
    else:
        param_space = protocol.trial_config(tune.grid_search([t.to_payload() for t in todo]),
                                            runtime)
        tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=max_concurrent,
                                      trial_dirname_creator=lambda t: protocol.trial_key(
                                          t.config, t.trial_id))
    max_failures = spec.max_failures if opts.max_failures is None else opts.max_failures
    # Ctrl-C raises KeyboardInterrupt here (run_campaign closes the runs as KILLED and prints
    # the --resume command) instead of Ray's handler, which ended fit() normally, hiding the
    # interruption between trials, and advised Tuner.restore, which this runner does not use.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Our tracker prints one line per trial event; silence Ray's own tables.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    run_config = tune.RunConfig(
        name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=str(campaign_dir / "ray"),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[tracker], stop=tracker.stopper(), verbose=0)
    each = f"{cpus:g} CPU / {gpus:g} GPU each" if not ray_train else (
        f"{workers} worker{'s' if workers > 1 else ''} of {cpus:g} CPU / {gpus:g} GPU each "
        "(Ray Train)")
    echo(f"[{clock()}] {remaining} trial(s) on Ray: {each}, max concurrent "
         f"{max_concurrent or 'unlimited'}, retries {max_failures}", flush=True)
    import logging

    # The tracker prints each failure as one line and logs its traceback as the child run's
    # error.txt; Ray's own copies (a traceback per attempt, "Trials did not complete") repeat it.
    # A campaign stopped early (a full store) leaves trials that never ran, whose missing
    # results Ray's analysis warns about, a line each; the summary lists them as NOT RUN.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune",
                 "ray.tune.analysis.experiment_analysis"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                       run_config=run_config)
    tuner.fit()


def warm_start(search: dict, finished: dict[str, Any]) -> tuple[list[dict], list[float]]:
    """Earlier finished samples -> (points_to_evaluate, evaluated_rewards) for the searcher.

    The search space sits under the `search` key of the Tuner's param_space and Ray's
    OptunaSearch flattens it to `search/<field>`: the points must use those names, or Optuna
    rejects them ("Inconsistent parameters") and a resumed search crashes.
    """
    points, rewards = [], []
    for r in finished.values():
        # The `search.<field>` tag is the sampled value verbatim; params may be the same value.
        vals = {f"search/{k}": rr.coerce_param(r.data.tags.get(rr.search_tag(k),
                                                               r.data.params.get(k)))
                for k in search["space"]}
        if search["metric"] in r.data.metrics and None not in vals.values():
            points.append(vals)
            rewards.append(r.data.metrics[search["metric"]])
    return points, rewards


def _start(run) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000))


def _summary_from_run(key: str, run, note: str) -> TrialSummary:
    """A trial finished by an earlier invocation, as its child run records it."""
    t = run.data.tags
    return TrialSummary(key, t.get(rr.ARM_TAG, "?"), int(t.get(rr.SEED_TAG, -1)),
                        run.info.status, {k: v for k, v in run.data.metrics.items()
                                          if rr.eval_name(k) is not None},
                        t.get(rr.ERROR_TAG), 0.0, run.info.run_id, note)


__all__ = [
    "CampaignResult",
    "Options",
    "TrialSummary",
    "init_ray",
    "run_campaign",
    "summary_table",
]
