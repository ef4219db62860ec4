"""How a trial and the driver talk: the trial's input, its reports, and their decoding.

The only module that touches a Ray trial's session (`ray.tune.report`, `get_checkpoint`,
`get_context`): a trial function calls the `report_*` functions and the accessors below, never
Ray itself, so trials could run elsewhere (e.g. as Ray Train workers) by changing this module.
A trial never touches the MLflow store (DESIGN §2, one writer); the driver's tracker
(`tracking.MlflowTracker`) decodes every report with `decode` and writes the record.

A trial function receives `config` = {"trial": payload, "runtime": Runtime fields[, "search":
{field: sampled value}]}: the payload of one expanded trial (`expand.Trial.to_payload`: key, arm,
seed, stages, config, arm_values; the template of an Optuna search), what the driver tells every
trial (`Runtime`), and an Optuna sample's values. `resolved_config`, `trial_key` and
`trial_arm` decode it.

Reports (each a `tune.report`; the driver sees them in `on_trial_result`):
- `{"event": "placement", "placement.<k>": v, ...}` first (`place_trial`, placement.py);
- `{"event": "train", "stage": s, "global_step": n, "train/<s>/<name>": v, ...}` every
  logged window (`"replayed": true` for the windows of a stage result the trial did not train);
- `{"event": "stage_done", "stage": s, "global_step": n, "source": trained | reused, "key": k,
  "steps": m}` + a checkpoint holding the finished stages (so a retry on another node skips
  them);
- `{"event": "final", "eval/<name>": v, ..., "placement.end": t}` + a checkpoint holding the
  run's artifacts (`sftok.run_record.write_trial_artifacts`);
- `{"event": "error", "error": "<Type>: <message>", "retry": bool}` just before a trial fails
  (`guarded`): the driver prints that one line and turns off retries of a deterministic failure.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sftok import run_record
from sftok.config import ConfigError, ExperimentConfig, from_dict, override
from sftok.storage import StorageError, StorageFullError, disk_full
from sftok.train import NonFiniteLossError
from sftok_experiments.placement import TAG_PREFIX, end_tag, trial_placement

TRIAL, RUNTIME, SEARCH = "trial", "runtime", "search"  # the parts of a trial's config
PLACEMENT, TRAIN, STAGE_DONE, FINAL, ERROR = "placement", "train", "stage_done", "final", "error"


def _session():
    """Ray Tune's trial session API (imported only where a trial runs or reports)."""
    from ray import tune

    return tune


# --------------------------------------------------------------------------------------------
# The trial's input
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """What the driver tells every trial besides its config: where things are, what it may use."""

    teacher_cache: str  # <cache dir>/teachers: the teachers the driver prepared
    eval_cache: str | None = None  # <cache dir>/eval: FID statistics, floor palettes, tokens
    work_root: str | None = None  # the trial works in <work_root>/<trial key>
    stage_store: str | None = None  # <work dir>/stages: stage results shared by the trials
    share_stages: bool = True  # False: every trial trains every stage in its own work dir
    cpus: int = 1  # intra-op threads (the CPUs Ray gave the trial)
    gpus: float = 0.0  # the trial's GPU share
    device: str | None = None  # --device; None: the config's


def trial_config(trial: Any, runtime: Runtime, search: dict | None = None) -> dict[str, Any]:
    """A trial's config (the Tuner's param_space): a payload (or a grid of them), the runtime
    and, for an Optuna search, its space."""
    out = {TRIAL: trial, RUNTIME: asdict(runtime)}
    if search is not None:
        out[SEARCH] = search
    return out


def payload(config: dict[str, Any]) -> dict[str, Any]:
    return config[TRIAL]


def runtime(config: dict[str, Any]) -> Runtime:
    return Runtime(**config[RUNTIME])


def search_values(config: dict[str, Any]) -> dict[str, Any]:
    """An Optuna sample's values ({} for an expanded trial)."""
    return dict(config.get(SEARCH) or {})


def resolved_config(config: dict[str, Any]) -> ExperimentConfig:
    """The trial's ExperimentConfig (an Optuna sample's values applied on the template)."""
    cfg = from_dict(ExperimentConfig, payload(config)["config"])
    sample = search_values(config)
    return override(cfg, sample) if sample else cfg


def trial_key(config: dict[str, Any], ray_trial_id: str | None = None) -> str:
    """The trial's key: the expanded one, or `search-<ray trial id>` for an Optuna sample
    (the id of the calling trial unless given: the driver names the trial it speaks of)."""
    if not search_values(config):
        return payload(config)["key"]
    if ray_trial_id is None:
        ray_trial_id = _session().get_context().get_trial_id()
    return run_record.search_trial_key(ray_trial_id)


def trial_arm(config: dict[str, Any]) -> str:
    """The arm label: the expanded one, or an Optuna sample's values (`lr=0.0003,...`)."""
    sample = search_values(config)
    if not sample:
        return payload(config)["arm"]
    return ",".join(f"{k.rsplit('.', 1)[-1]}={f'{v:.4g}' if isinstance(v, float) else v}"
                    for k, v in sample.items())


# --------------------------------------------------------------------------------------------
# The trial's session: where it runs, its directory, its last checkpoint
# --------------------------------------------------------------------------------------------


def place_trial(config: dict[str, Any], cfg: ExperimentConfig) -> str:
    """The trial's device (`--device`, else the config's, placed by Ray's GPU share); reports
    where the trial runs before anything else (placement.py)."""
    rt = runtime(config)
    return trial_placement(rt.device or cfg.device, rt.gpus, report=_report_placement)


def _report_placement(tags: dict[str, str]) -> None:
    _session().report({"event": PLACEMENT, **tags})


def trial_dir() -> Path:
    """The Ray trial's own directory (a trial without a shared work dir works in it)."""
    return Path(_session().get_context().get_trial_dir())


@contextlib.contextmanager
def _directory(ckpt) -> Iterator[Path | None]:
    """A Ray checkpoint as a local directory (None for no checkpoint)."""
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)


def last_checkpoint() -> contextlib.AbstractContextManager[Path | None]:
    """The directory of the trial's last checkpoint (a retry's), or None."""
    return _directory(_session().get_checkpoint())


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _quiet_ray_logs() -> None:
    # "Checkpoint successfully created at ..." on every report would drown the event lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def report_train(stage: str, global_step: int, metrics: dict[str, float],
                 replayed: bool = False) -> None:
    """One logged window of `stage` (metric names of docs/architecture.md) at a global step;
    replayed: the window of a result trained before (by another trial or an earlier attempt)."""
    out: dict[str, Any] = {"event": TRAIN, "stage": stage, "global_step": int(global_step)}
    out.update({run_record.train_key(stage, k): float(v) for k, v in metrics.items()
                if isinstance(v, (int, float))})
    if replayed:
        out["replayed"] = True
    _session().report(out)


def stage_reporters(stage: str) -> tuple[Callable[[int, dict], None], Callable[[int, dict], None]]:
    """(live, replayed) training callbacks of `stage` (`StageStore.obtain`'s callback and
    replay_callback): both report the stage's windows; replayed ones say so."""
    return (functools.partial(report_train, stage),
            functools.partial(report_train, stage, replayed=True))


def report_stage_done(stage: str, global_step: int, snapshot: Path | None = None,
                      **info: Any) -> None:
    """A finished stage; snapshot: the finished stages' directory (`stage_store.snapshot`);
    info: the stage result's `source` (trained / reused), `key` and `steps`."""
    tune = _session()
    _quiet_ray_logs()
    ckpt = tune.Checkpoint.from_directory(str(snapshot)) if snapshot else None
    tune.report({"event": STAGE_DONE, "stage": stage, "global_step": int(global_step), **info},
                checkpoint=ckpt)


def report_final(metrics: dict[str, float], artifacts: Path) -> None:
    """Last report of a successful trial: the evaluator's metrics + the artifacts directory."""
    tune = _session()
    _quiet_ray_logs()
    out: dict[str, Any] = {"event": FINAL, **end_tag()}
    out.update({run_record.eval_key(k): float(v) for k, v in metrics.items()})
    tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(artifacts)))


# Errors a retry would only repeat: same config + data + seed give the same failure; a full or
# read-only disk stays so until someone frees or fixes it (--resume then).
DETERMINISTIC_ERRORS = (ConfigError, NonFiniteLossError, StorageError)


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line (what the driver prints and tags as `error`)."""
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}"[:1000] if msg else type(exc).__name__


def report_error(exc: BaseException) -> None:
    """Tell the driver why this trial is about to fail, and whether a retry could help.

    Sent before the exception propagates, so the driver has the one-line cause even when the
    exception does not survive Ray, and can turn off retries of a deterministic failure
    (`MlflowTracker.on_trial_result`): Ray Tune's FailureConfig retries every error alike.
    """
    _session().report({"event": ERROR, "error": one_line(exc),
                       "retry": not isinstance(exc, DETERMINISTIC_ERRORS)})


def _survives_ray(exc: BaseException) -> bool:
    """Ray copies (`copy.copy`) and pickles a trial's exception; can it be rebuilt?"""
    import ray.cloudpickle as cp

    try:
        copy.copy(exc)
        cp.loads(cp.dumps(exc))
        return True
    except Exception:  # noqa: BLE001 — any failure to rebuild means "no"
        return False


def _quiet_exit_hook(unraisable) -> None:
    """sys.unraisablehook of a trial process: a SystemExit raised by Ray's SIGTERM handler
    while a finaliser runs (the worker being stopped at shutdown or on Ctrl-C) is the exit
    that was asked for, not an error: no 'Exception ignored in ...' traceback for it."""
    if isinstance(unraisable.exc_value, (SystemExit, KeyboardInterrupt)):
        return
    sys.__unraisablehook__(unraisable)


def _as_storage_error(exc: Exception, config: dict[str, Any]) -> Exception:
    """A full disk met where no writer named what it wrote (Ray persisting a checkpoint into
    the work dir, the trial's temporary files): a `StorageFullError` naming where."""
    work = (config.get("runtime") or {}).get("work_root") or tempfile.gettempdir()
    if isinstance(exc, StorageError) or not disk_full(exc, work):
        return exc
    where = getattr(exc, "filename", None) or f"{work} or {tempfile.gettempdir()}"
    return StorageFullError(where, "the trial's files", "")


def guarded(fn):
    """Wrap a trial function: its error reaches the driver as one line, survives pickling, and
    a deterministic failure is not retried (`report_error`)."""

    @functools.wraps(fn)
    def trial_fn(config: dict[str, Any]) -> None:
        sys.unraisablehook = _quiet_exit_hook
        try:
            fn(config)
        except Exception as exc:
            e = _as_storage_error(exc, config)
            with contextlib.suppress(Exception):  # the error below still reaches the driver
                report_error(e)
            if _survives_ray(e):
                if e is exc:
                    raise
                raise e from exc
            # An exception class whose __init__ cannot be called with its args (a third-party
            # one, say) would turn into a TypeError of Ray's: keep its text instead.
            raise RuntimeError(f"{one_line(e)}\n{''.join(traceback.format_exception(e))}"
                               ) from None

    return trial_fn


# --------------------------------------------------------------------------------------------
# The driver's side: decoding a report
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    """One decoded report (`decode`); the fields of other events keep their defaults."""

    event: str | None
    tags: dict[str, str] = field(default_factory=dict)  # placement.* (any event may carry them)
    stage: str | None = None  # train, stage_done
    step: int = 0  # the global step (train, stage_done)
    metrics: dict[str, float] = field(default_factory=dict)  # train: the stage's metric names;
    # final: the evaluator's names (the record adds train/<stage>/ and eval/)
    replayed: bool = False  # train: a window of a stage result trained before
    source: str | None = None  # stage_done: trained / reused (None: not content-addressed)
    key: str = ""  # stage_done: the stage result's key
    steps: int = 0  # stage_done: the stage's steps
    error: str | None = None  # error: the one-line cause
    retry: bool = True  # error: whether a retry could help


def decode(result: dict[str, Any]) -> Report:
    """The report in a result Ray hands the driver (the module docstring's formats)."""
    event = result.get("event")
    rep = Report(event, tags={k: v for k, v in result.items() if k.startswith(TAG_PREFIX)})
    if event == TRAIN:
        rep.stage, rep.step = str(result.get("stage")), int(result.get("global_step", 0))
        prefix = run_record.train_prefix(rep.stage)
        rep.metrics = {k[len(prefix):]: v for k, v in result.items()
                       if k.startswith(prefix) and isinstance(v, (int, float))}
        rep.replayed = bool(result.get("replayed", False))
    elif event == STAGE_DONE:
        rep.stage, rep.step = result.get("stage"), int(result.get("global_step", 0))
        rep.source, rep.key = result.get("source"), str(result.get("key", ""))
        rep.steps = int(result.get("steps", 0))
    elif event == FINAL:
        rep.metrics = {name: v for k, v in result.items()
                       if (name := run_record.eval_name(k)) is not None
                       and isinstance(v, (int, float))}
    elif event == ERROR:
        rep.error = str(result.get("error") or "") or None
        rep.retry = bool(result.get("retry", True))
    return rep


def final_artifacts(trial) -> contextlib.AbstractContextManager[Path | None]:
    """The artifacts directory a finished Ray trial reported with `report_final` (or None)."""
    return _directory(trial.checkpoint)
