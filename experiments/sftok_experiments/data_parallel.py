"""A trial on W workers (issue 19): its stages, evaluation and generator trained by Ray Train.

With `--workers-per-trial W` > 1 the Tune trial process (`trial.run_trial`) is a driver: it keeps
the stage store, its lock and the publishing of results (`StageStore.obtain`, with
`TrialWorkers.train_stage` as its `train_fn`), and for each piece of work it starts a
`ray.train.torch.TorchTrainer` of W workers and waits for it (`fit`):
- a stage: every rank runs `train_stage(..., workers=)` inside the store's `.building/<key>/`
  (periodic checkpoints there, written by rank 0 with every rank's RNG state), so a retry,
  `--resume` after a driver kill, or another trial continues it from its last checkpoint;
- the evaluation: sharded over the ranks (`evaluation.evaluate_trial`), rank 0 writes the
  artifacts into `<trial work dir>/artifacts`, which the driver reports (`report_final`);
- the generation stage: tokens and generator on every rank, sampling and scoring on rank 0.
The workers report their placement and training windows through `protocol` (ray.train.report;
rank 0's reach the MLflow tracker, which the campaign's driver alone writes); the trial process
reports its start, `stage_done` and `final`. W = 1 comes here only with `--ray-train`
(`Runtime.ray_train`: the device check's one-GPU NCCL run); otherwise `trial.run_trial` trains in
the trial process, as before issue 19.

Runs are named by the trial key and the work (`<key>.<stage>`, `<key>.evaluate`) under
`<trial work dir>/ray_train`, so a resumed trial finds the same run. Resources: each worker
reserves `--cpus-per-trial` CPUs and `--gpus-per-trial` GPUs (a whole number: NCCL needs a GPU
per rank; gloo when the workers have none); the trial process reserves no CPU or GPU
(`placement.trial_resources`), so two 2-worker trials fit 4 CPUs.

Failures: Ray Train does not retry (its FailureConfig max_failures 0); the trial fails with one
line and Tune's FailureConfig (the spec's `max_failures`, `--max-failures`) retries it from the
last checkpoint unless the error is deterministic (a NaN, a bad config value: `protocol`). A rank
whose process dies ends the run within seconds (the controller polls its workers every 2 s and
stops the others) as a `WorkerDiedError` naming the rank, its node and pid and the cause; a rank
that raises ends it with that rank's own exception (e.g. the NonFiniteLossError every rank agrees
on, naming the rank that saw the NaN).
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sftok import run_record
from sftok.checkpoint import load_model
from sftok.config import ExperimentConfig, from_dict, override, to_dict
from sftok.data import CorruptImageWarning, build_train_dataset
from sftok.distributed import DEFAULT_TIMEOUT_S, RankFailedError, Workers
from sftok.train import get_teacher, train_stage
from sftok.train.loop import read_final
from sftok_experiments import protocol
from sftok_experiments.evaluation import evaluate_trial
from sftok_experiments.generation import (
    generation_artifacts,
    report_generation_done,
    train_generation,
)

STAGE, EVALUATE, GENERATION = "stage", "evaluate", "generation"  # the kinds of worker job
ARTIFACTS = "artifacts"  # <trial work dir>/artifacts: what rank 0 writes for the final report


class WorkerDiedError(RuntimeError):
    """A worker process of a data-parallel trial died (killed, out of memory, node lost)."""

    def __init__(self, rank: int, world_size: int, what: str, where: str, cause: str):
        self.rank, self.world_size, self.what, self.where, self.cause = (
            rank, world_size, what, where, cause)
        super().__init__(
            f"worker rank {rank} of {world_size} ({where}) died while {what}: {cause}; the other "
            "ranks were stopped, the last checkpoint is kept and a retry (--max-failures) or "
            "--resume continues from it")

    def __reduce__(self):
        return (type(self), (self.rank, self.world_size, self.what, self.where, self.cause))


# --------------------------------------------------------------------------------------------
# The trial process: one Ray Train run per piece of work
# --------------------------------------------------------------------------------------------


class TrialWorkers:
    """The Ray Train runs of one data-parallel trial (made and used in the trial process).

    rt: the trial's runtime (W = rt.workers, each worker's CPUs / GPUs); cfg: its resolved
    config; key: the trial key; work: its work directory (on storage every node reads)."""

    def __init__(self, rt: protocol.Runtime, cfg: ExperimentConfig, key: str, work: Path,
                 payload: dict[str, Any]):
        self.rt, self.cfg, self.key, self.work, self.payload = rt, cfg, key, Path(work), payload

    def train_stage(self, cfg: ExperimentConfig, stage: str, teacher, out_dir: Path,
                    init: Path | None = None, callback=None, resume: bool = True,
                    step_offset: int = 0, id_cache_dir: Path | None = None) -> None:
        """`StageStore.obtain`'s train_fn: train `stage` into out_dir on the W workers (they
        load the teacher and report the windows themselves: `teacher` and `callback` unused)."""
        self._fit(stage, f"training {stage}", {
            "kind": STAGE, "config": to_dict(cfg), "stage": stage, "out_dir": str(out_dir),
            "init": str(init) if init is not None else None, "step_offset": step_offset,
            "id_cache_dir": str(id_cache_dir) if id_cache_dir is not None else None})

    def evaluate(self, tokenizer_dir: Path) -> tuple[dict[str, float], Path]:
        """The sharded evaluation of the trial's tokenizer -> (metrics, artifacts dir)."""
        art = self._fresh_artifacts()
        self._fit("evaluate", "evaluating", {"kind": EVALUATE, "tokenizer": str(tokenizer_dir),
                                             "art": str(art)})
        return run_record.read_eval_metrics(art), art

    def generation(self, tokenizer_dir: Path, step_offset: int, done: list, tmp: Path) -> None:
        """The generation stage on the W workers, then its stage_done and final reports."""
        art = self._fresh_artifacts()
        self._fit("generation", "training the generator", {
            "kind": GENERATION, "tokenizer": str(tokenizer_dir), "art": str(art),
            "step_offset": step_offset})
        result = read_final(self.work / "generation")
        report_generation_done(result.final_dir, result.steps, step_offset, done, tmp)
        protocol.report_final(run_record.read_eval_metrics(art), art)

    def _fresh_artifacts(self) -> Path:
        art = self.work / ARTIFACTS
        shutil.rmtree(art, ignore_errors=True)  # an earlier attempt's
        return art

    def _fit(self, name: str, what: str, job: dict[str, Any]) -> None:
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.train.v2.api.exceptions import TrainingFailedError

        rt = self.rt
        device = rt.device or self.cfg.device
        gpus = rt.gpus > 0
        resources = {"CPU": rt.cpu_share, **({"GPU": rt.gpus} if gpus else {})}
        # A Ray preemption watcher per run logs an error line at every start; node preemption
        # is handled as any failure here (Tune retries the trial from its checkpoint).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's own logging set-up (dictConfig in its controller and workers) would reset
        # the levels the worker setup hook gave its noisy loggers (`protocol.NOISY_RAY_LOGGERS`);
        # without it they keep them. Ray Train hands these variables to its controller and
        # workers itself.
        for var in ("RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING",
                    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING"):
            os.environ.setdefault(var, "0")
        trainer = TorchTrainer(
            worker_main,
            train_loop_config={**job, "runtime": asdict(rt), "payload": self.payload,
                               "trial_config": to_dict(self.cfg), "work": str(self.work)},
            # NCCL with a GPU per worker, gloo on CPU (also with a GPU share and --device cpu)
            torch_config=TorchConfig(backend="nccl" if gpus and device != "cpu" else "gloo",
                                     timeout_s=int(DEFAULT_TIMEOUT_S)),
            scaling_config=ray.train.ScalingConfig(num_workers=rt.workers, use_gpu=gpus,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=f"{self.key}.{name}", storage_path=str(self.work / "ray_train"),
                failure_config=ray.train.FailureConfig(max_failures=0),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                callbacks=[protocol.worker_report_callback()]))
        try:
            trainer.fit()
        except TrainingFailedError as e:
            raise failure(e, rt.workers, what) from e


def failure(error: Exception, world_size: int, what: str) -> BaseException:
    """The one exception a failed Ray Train run stands for (see the module docstring): a dead
    rank's `WorkerDiedError`, else the first rank's own exception (not the `RankFailedError` of
    a rank that only heard of another's failure), else a one-line RuntimeError."""
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    if isinstance(error, WorkerGroupError):
        fails = dict(sorted(error.worker_failures.items()))
        dead = {r: e for r, e in fails.items()
                if isinstance(e, (WorkerHealthCheckFailedError, RayActorError))}
        if dead:
            rank, e = next(iter(dead.items()))
            return WorkerDiedError(rank, world_size, what, *_death(e))
        own = [e for e in fails.values() if not isinstance(e, RankFailedError)]
        if own or fails:
            return (own or list(fails.values()))[0]
    if isinstance(error, ControllerError):
        return RuntimeError(f"Ray Train could not run the {world_size} workers while {what}: "
                            f"{protocol.one_line(error.controller_failure)}")
    return RuntimeError(f"Ray Train failed while {what}: {protocol.one_line(error)}")


def _death(error: Exception) -> tuple[str, str]:
    """(where: 'pid P on node N', cause: one line) of a dead worker's error."""
    text = str(error)
    node = re.search(r"hostname='([^']*)'", text) or re.search(r"node_ip='([^']*)'", text)
    pid = re.search(r"\bpid=(\d+)", text)
    where = " on ".join(p for p in (f"pid {pid.group(1)}" if pid else "",
                                    f"node {node.group(1)}" if node else "") if p)
    # Ray's detail, without its paragraph of possible causes (the OOM killer, `ray stop`, a
    # crash), which it says after the facts and which would not keep the line short.
    detail = re.search(r"Worker exit detail: (.+?)(?: Some common causes include| There are some "
                       r"potential root causes|$)", " ".join(text.split()))
    cause = (f"{detail.group(1).strip()} (killed, out of memory or crashed: see the node's "
             "kernel log and Ray's worker logs)") if detail else protocol.one_line(
        getattr(error, "health_check_failure", error))
    return where or "unknown process", cause[:400]


# --------------------------------------------------------------------------------------------
# Inside each of the W workers
# --------------------------------------------------------------------------------------------


def worker_main(job: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: one piece of a trial's work on this rank (Ray Train
    has started the process group: gloo, or NCCL with one GPU per rank)."""
    rt = protocol.Runtime(**job["runtime"])
    torch.set_num_threads(max(1, int(rt.cpus)))  # intra-op threads = the worker's CPUs
    os.environ.setdefault("SFTOK_PROGRESS", "0")
    # Skipped files are counted and reported (train/<stage>/data_skipped, eval/skipped_images).
    warnings.filterwarnings("ignore", category=CorruptImageWarning)

    ctx = protocol.worker_context()
    cfg = from_dict(ExperimentConfig, job["trial_config"])
    group = Workers.from_process_group(local_rank=ctx.local_rank)
    device = protocol.place_worker(rt.device or cfg.device, group.all_gather_object)
    workers = Workers(ctx.rank, ctx.world_size, ctx.local_rank, device)
    # The driver trained (or loaded) the teacher before any trial: the workers only load it.
    teacher = get_teacher(override(cfg, {"device": device}), Path(rt.teacher_cache),
                          train_if_missing=False)
    kind = job["kind"]
    if kind == STAGE:
        stage_cfg = from_dict(ExperimentConfig, job["config"])
        if device != stage_cfg.device:
            stage_cfg = override(stage_cfg, {"device": device})
        train_stage(stage_cfg, job["stage"], teacher, Path(job["out_dir"]),
                    init=Path(job["init"]) if job["init"] else None,
                    callback=protocol.worker_stage_reporter(job["stage"]), resume=True,
                    step_offset=job["step_offset"],
                    id_cache_dir=Path(job["id_cache_dir"]) if job["id_cache_dir"] else None,
                    workers=workers)
    elif kind == EVALUATE:
        evaluate_trial(cfg, Path(job["tokenizer"]), teacher, device, rt, job["payload"],
                       Path(job["art"]), workers)
    elif kind == GENERATION:
        _generation(cfg, job, teacher, device, rt, workers)
    else:
        raise ValueError(f"unknown worker job {kind!r}")


def _generation(cfg: ExperimentConfig, job: dict[str, Any], teacher, device: str,
                rt: protocol.Runtime, workers: Workers) -> None:
    """Tokens and generator on every rank; sampling, scoring and artifacts on rank 0 (the
    generation evaluation is not sharded)."""
    tokenizer_dir = Path(job["tokenizer"])
    tokenizer = load_model(tokenizer_dir, device)[0].eval()
    train_ds = build_train_dataset(cfg.data)
    tokens, hit, res = train_generation(
        cfg, tokenizer_dir, tokenizer, train_ds, Path(job["work"]), device, rt,
        protocol.worker_stage_reporter("generation"), job["step_offset"], workers)
    workers.on_main("scoring the generator", lambda: generation_artifacts(
        cfg, tokenizer_dir, tokenizer, train_ds, teacher, tokens, hit, res.checkpoint,
        job["payload"], device, rt, Path(job["art"])), share=False)


__all__ = ["TrialWorkers", "WorkerDiedError", "failure", "worker_main"]
