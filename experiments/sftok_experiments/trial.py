"""The Ray Tune trial: stage pipeline (train_stage) -> evaluate -> artifacts, reported back.

A trial never touches the MLflow store (DESIGN §2, one writer): it sends training metrics with
`tune.report` and its artifacts (config.json, eval.json, trace.csv, grids/, checkpoint/) as the
directory of its final `tune.Checkpoint`, which Ray persists to the run's storage; the driver's
`tracking.MlflowTracker` logs both.

Report protocol (shared with the test trial functions, see `report_train` / `report_final`):
- `{"event": "train", "stage": s, "global_step": n, "train/<s>/<name>": v, ...}`
- `{"event": "stage_done", "stage": s, "global_step": n}` + a checkpoint holding the finished
  stages (so a retry on another node skips them)
- `{"event": "final", "eval/<name>": v, ...}` + a checkpoint holding the artifacts.

Stage results live in the content-addressed store `runtime.stage_store` (`stage_store.py`):
each distinct stage result is trained once per work directory and every trial that needs it
starts from it; `runtime.share_stages` False gives each trial its own store
(`<work_root>/<trial key>/stages`), so every trial trains every stage. `stage_done` reports
say which (`source`: trained / reused) and the result's `key`.

Resumability: a stage being trained lives in the store's `.building/<key>/` — the same
directory on a retry (`FailureConfig`), on `--resume`, and for whichever trial takes it over
— and `train_stage(resume=True)` continues from its last periodic checkpoint there (a
published result is never retrained).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from sftok_experiments.placement import end_tag, trial_placement

FINAL_EVENT = "final"
STAGE_DONE = "stage_done"
ERROR_EVENT = "error"


# --------------------------------------------------------------------------------------------
# Reporting helpers (also used by the fake trial functions of the tests)
# --------------------------------------------------------------------------------------------


def _quiet_ray_logs() -> None:
    import logging

    # "Checkpoint successfully created at ..." on every report would drown the event lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def report_train(stage: str, global_step: int, metrics: dict[str, float]) -> None:
    from ray import tune

    out: dict[str, Any] = {"event": "train", "stage": stage, "global_step": int(global_step)}
    out.update({f"train/{stage}/{k}": float(v) for k, v in metrics.items()
                if isinstance(v, (int, float))})
    tune.report(out)


def report_stage_done(stage: str, global_step: int, snapshot: Path | None = None,
                      **info: Any) -> None:
    """info: the stage result's `source` (trained / reused), `key` and `steps`."""
    from ray import tune

    _quiet_ray_logs()
    ckpt = tune.Checkpoint.from_directory(str(snapshot)) if snapshot else None
    tune.report({"event": STAGE_DONE, "stage": stage, "global_step": int(global_step), **info},
                checkpoint=ckpt)


def report_final(metrics: dict[str, float], artifacts: Path) -> None:
    """Last report of a successful trial: eval metrics + the artifacts directory."""
    from ray import tune

    _quiet_ray_logs()
    out: dict[str, Any] = {"event": FINAL_EVENT, **end_tag()}
    out.update({f"eval/{k}": float(v) for k, v in metrics.items()})
    tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(artifacts)))


def _deterministic_errors() -> tuple[type[BaseException], ...]:
    """Errors a retry would only repeat: same config + data + seed give the same failure."""
    from sftok.config import ConfigError
    from sftok.storage import StorageError
    from sftok.train import NonFiniteLossError

    # A full or read-only disk stays so until someone frees or fixes it: --resume then.
    return (ConfigError, NonFiniteLossError, StorageError)


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
    from ray import tune

    tune.report({"event": ERROR_EVENT, "error": one_line(exc),
                 "retry": not isinstance(exc, _deterministic_errors())})


def _survives_ray(exc: BaseException) -> bool:
    """Ray copies (`copy.copy`) and pickles a trial's exception; can it be rebuilt?"""
    import copy

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
    the work dir, the trial's temporary files): a `StorageFullError` naming the work dir."""
    from sftok.storage import StorageError, StorageFullError, disk_full

    work = (config.get("runtime") or {}).get("work_root") or tempfile.gettempdir()
    if isinstance(exc, StorageError) or not disk_full(exc, work):
        return exc
    where = getattr(exc, "filename", None) or f"{work} or {tempfile.gettempdir()}"
    return StorageFullError(where, "the trial's files", "")


def guarded(fn):
    """Wrap a trial function: its error reaches the driver as one line, survives pickling, and
    a deterministic failure is not retried (`report_error`)."""
    import functools

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
            import traceback

            # An exception class whose __init__ cannot be called with its args (a third-party
            # one, say) would turn into a TypeError of Ray's: keep its text instead.
            raise RuntimeError(f"{one_line(e)}\n{''.join(traceback.format_exception(e))}"
                               ) from None

    return trial_fn


def trial_key(config: dict[str, Any]) -> str:
    """The trial's key: the expanded one, or `search-<ray trial id>` for an Optuna sample."""
    if config.get("search"):
        from ray import tune

        return f"search-{tune.get_context().get_trial_id()}"
    return config["trial"]["key"]


def resolved_config(config: dict[str, Any]):
    """The trial's ExperimentConfig (an Optuna sample's values applied on the template)."""
    from sftok.config import ExperimentConfig, from_dict, override

    cfg = from_dict(ExperimentConfig, config["trial"]["config"])
    if config.get("search"):
        cfg = override(cfg, dict(config["search"]))
    return cfg


def place_trial(config: dict[str, Any], cfg) -> str:
    """The trial's device: `--device` (runtime) or the config's, placed by Ray's GPU share."""
    runtime = config["runtime"]
    return trial_placement(runtime.get("device") or cfg.device, runtime.get("gpus"))


def write_artifacts(out: Path, cfg_dict: dict[str, Any], payload: dict[str, Any],
                    metrics: dict[str, float], unavailable: dict[str, str],
                    trace: list[dict], grids: dict[int, Any], checkpoint: Path | None) -> Path:
    """The artifact layout of a child run (docs/architecture.md)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(
        {"config": cfg_dict, "stages": payload["stages"], "arm": payload["arm"],
         "seed": payload["seed"], "arm_values": payload.get("arm_values", {})}, indent=1))
    (out / "eval.json").write_text(json.dumps(
        {"metrics": metrics, "unavailable": unavailable}, indent=1, default=float))
    if trace:
        cols = list(trace[0])
        with open(out / "trace.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(trace)
    if grids:
        from PIL import Image

        (out / "grids").mkdir(exist_ok=True)
        for s, arr in grids.items():
            Image.fromarray(arr).save(out / "grids" / f"recon_s{s}.png")
    if checkpoint is not None:
        shutil.copytree(checkpoint, out / "checkpoint")
    return out


# --------------------------------------------------------------------------------------------
# The real trial
# --------------------------------------------------------------------------------------------


def _restore_from_ray_checkpoint(store, work: Path | None = None) -> None:
    """A retry on another node: publish the finished stages of the last Ray checkpoint (a
    content-addressed one into the store; one without a key, e.g. the generator, back into
    `work/<stage>/final`)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        for stage_dir in Path(d).iterdir():
            key_file = stage_dir / "key.txt"
            if not (stage_dir / "final").is_dir():
                continue
            if key_file.exists():
                store.adopt(key_file.read_text().strip(), stage_dir / "final")
            elif work is not None and not (work / stage_dir.name / "final").exists():
                (work / stage_dir.name).mkdir(parents=True, exist_ok=True)
                shutil.copytree(stage_dir / "final", work / stage_dir.name / "final")


def _snapshot(outcomes: list, tmp: Path) -> Path:
    """Ray checkpoint of the finished stages: <stage>/final (+ key.txt when content-addressed)."""
    snap = tmp / f"snapshot-{len(outcomes)}"
    for o in outcomes:
        shutil.copytree(o.checkpoint, snap / o.stage / "final")
        if o.key:
            (snap / o.stage / "key.txt").write_text(o.key)
    return snap


def _load_tokenizer(ckpt_dir: Path, device):
    from sftok.checkpoint import load_model

    model = load_model(ckpt_dir)
    if isinstance(model, tuple):  # (module, cfg)
        model = model[0]
    return model.to(device).eval()


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: config = {"trial": payload, "runtime": {...}[, "search"]}."""
    import torch

    from sftok.config import to_dict

    runtime = config["runtime"]
    cpus = max(1, int(runtime.get("cpus", 1)))
    torch.set_num_threads(cpus)  # intra-op threads = the CPUs Ray gave this trial
    os.environ.setdefault("SFTOK_PROGRESS", "0")  # no progress bars inside Ray workers
    import warnings

    from sftok.data import CorruptImageWarning

    # Skipped files are counted and reported to the driver (train/<stage>/data_skipped,
    # eval/skipped_images), which prints one line for the campaign: no warning per worker.
    warnings.filterwarnings("ignore", category=CorruptImageWarning)

    from sftok.data import build_val_dataset, val_batches
    from sftok.evaluate import dataset_key, evaluate
    from sftok.evaluate.bounds import build_bounds
    from sftok.storage import writing
    from sftok.train import TeacherUnavailableError, get_teacher
    from sftok.train.loop import resolve_device

    payload = config["trial"]
    cfg = resolved_config(config)
    # Before anything heavy: a trial on a node without its device fails here, in one line.
    dev = place_trial(config, cfg)
    if dev != cfg.device:
        from sftok.config import override

        cfg = override(cfg, {"device": dev})  # train_stage / get_teacher read cfg.device
    key = trial_key(config)
    work_root = runtime.get("work_root")
    if work_root:
        work = Path(work_root) / key
    else:  # no shared work dir: the Ray trial directory (retries rely on Ray checkpoints)
        from ray import tune

        work = Path(tune.get_context().get_trial_dir()) / "work"
    work.mkdir(parents=True, exist_ok=True)
    from sftok_experiments.stage_store import StageStore

    store = StageStore(runtime["stage_store"] if runtime.get("share_stages", True)
                       and runtime.get("stage_store") else work / "stages")
    _restore_from_ray_checkpoint(store, work)

    device = resolve_device(cfg.device)
    # The driver trained (or loaded) the teacher before any trial: trials only load it. On a
    # cluster whose nodes do not share --cache-dir this fails loudly instead of quietly
    # training a different teacher (a different codebook) on every node.
    try:
        teacher = get_teacher(cfg, Path(runtime["teacher_cache"]), train_if_missing=False)
    except TeacherUnavailableError as e:
        raise TeacherUnavailableError(f"{e} (trial on {platform.node()}: put --cache-dir on "
                                      "storage every Ray node can read)") from e
    teacher = teacher.to(device)

    tmp = Path(tempfile.mkdtemp(prefix="sftok-trial-"))
    try:
        prev, offset, done = None, 0, []
        for stage in [s for s in payload["stages"] if s != "generation"]:
            def callback(step: int, metrics: dict[str, float], _stage: str = stage) -> None:
                report_train(_stage, step, metrics)

            prev = store.obtain(cfg, stage, teacher, init=prev, callback=callback,
                                step_offset=offset, echo=lambda m: print(m, flush=True),
                                id_cache_dir=Path(runtime["teacher_cache"]) / "ids")
            offset += prev.steps
            done.append(prev)
            with writing(tmp, "the trial's snapshot of its finished stages"):
                snapshot = _snapshot(done, tmp)
            report_stage_done(stage, offset, snapshot, source=prev.source,
                              key=prev.key, steps=prev.steps)

        init = prev.checkpoint if prev is not None else None
        if "generation" in payload["stages"]:  # Table 2: the tokenizer feeds a generator
            from sftok_experiments.generation import run_generation

            source = init if init is not None else Path(cfg.generation.tokenizer)
            run_generation(cfg, source, teacher, work, tmp, payload, device, runtime, offset,
                           done)
            return
        tokenizer = _load_tokenizer(init, device)
        val = build_val_dataset(cfg.data)  # never scans the training data
        images = val_batches(val, cfg.eval.batch_size, cfg.eval.max_images)
        # Floors (naive codecs with the tokenizer's / teacher's bits) and the teacher ceiling
        # are scored on the same images: every table places the arms between them (issue 9).
        bounds = build_bounds(cfg, runtime.get("eval_cache"))
        result = evaluate(tokenizer, teacher, images, cfg.eval, device=device,
                          cache_dir=runtime.get("eval_cache"), progress=False,
                          decode_cfg=cfg.decode, dataset_key=dataset_key(cfg), bounds=bounds)
        metrics = {**result.metrics, "skipped_images": images.skipped}  # left out, not scored
        with writing(tmp, "the trial's artifacts"):
            art = write_artifacts(tmp / "artifacts", to_dict(cfg), payload, metrics,
                                  result.unavailable, result.trace, result.grids, init)
        report_final(metrics, art)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
