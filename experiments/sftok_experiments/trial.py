"""The Ray Tune trial: stage pipeline (train_stage) -> evaluate -> artifacts, reported back.

`run_trial(config)` is the trial function (`protocol.guarded` wraps it): it speaks to the driver
only through `protocol` (its input, reports and checkpoints) and writes its artifacts with
`sftok.run_record`; the driver's tracker logs both (DESIGN §2, one writer).

Stage results live in the content-addressed store `Runtime.stage_store` (`stage_store.py`):
each distinct stage result is trained once per work directory and every trial that needs it
starts from it; `Runtime.share_stages` False gives each trial its own store
(`<work_root>/<trial key>/stages`), so every trial trains every stage. `stage_done` reports
say which (`source`: trained / reused) and the result's `key`.

Resumability: a stage being trained lives in the store's `.building/<key>/` — the same
directory on a retry (`FailureConfig`), on `--resume`, and for whichever trial takes it over
— and `train_stage(resume=True)` continues from its last periodic checkpoint there (a
published result is never retrained). A retry on another node first publishes the finished
stages its last Ray checkpoint holds.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from sftok import run_record
from sftok.checkpoint import load_model
from sftok.config import override, to_dict
from sftok.data import CorruptImageWarning, build_val_dataset, val_batches
from sftok.evaluate import dataset_key, evaluate
from sftok.evaluate.bounds import build_bounds
from sftok.storage import writing
from sftok.train import TeacherUnavailableError, get_teacher
from sftok.train.loop import resolve_device
from sftok_experiments import protocol
from sftok_experiments.generation import run_generation
from sftok_experiments.stage_store import StageStore, snapshot


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: config = {"trial": payload, "runtime": {...}[, "search"]}."""
    rt = protocol.runtime(config)
    torch.set_num_threads(max(1, int(rt.cpus)))  # intra-op threads = the CPUs Ray gave it
    os.environ.setdefault("SFTOK_PROGRESS", "0")  # no progress bars inside Ray workers
    # Skipped files are counted and reported to the driver (train/<stage>/data_skipped,
    # eval/skipped_images), which prints one line for the campaign: no warning per worker.
    warnings.filterwarnings("ignore", category=CorruptImageWarning)

    payload = protocol.payload(config)
    cfg = protocol.resolved_config(config)
    # Before anything heavy: a trial on a node without its device fails here, in one line.
    dev = protocol.place_trial(config, cfg)
    if dev != cfg.device:
        cfg = override(cfg, {"device": dev})  # train_stage / get_teacher read cfg.device
    key = protocol.trial_key(config)
    # No shared work dir: the Ray trial directory (retries rely on Ray checkpoints).
    work = Path(rt.work_root) / key if rt.work_root else protocol.trial_dir() / "work"
    work.mkdir(parents=True, exist_ok=True)
    store = StageStore(rt.stage_store if rt.share_stages and rt.stage_store
                       else work / "stages")
    with protocol.last_checkpoint() as last:
        if last is not None:
            store.restore(last, work)

    device = resolve_device(cfg.device)
    # The driver trained (or loaded) the teacher before any trial: trials only load it. On a
    # cluster whose nodes do not share --cache-dir this fails loudly instead of quietly
    # training a different teacher (a different codebook) on every node.
    try:
        teacher = get_teacher(cfg, Path(rt.teacher_cache), train_if_missing=False)
    except TeacherUnavailableError as e:
        raise TeacherUnavailableError(f"{e} (trial on {platform.node()}: put --cache-dir on "
                                      "storage every Ray node can read)") from e
    teacher = teacher.to(device)

    tmp = Path(tempfile.mkdtemp(prefix="sftok-trial-"))
    try:
        prev, offset, done = None, 0, []
        for stage in [s for s in payload["stages"] if s != "generation"]:
            live, replayed = protocol.stage_reporters(stage)
            prev = store.obtain(cfg, stage, teacher, init=prev, callback=live,
                                replay_callback=replayed, step_offset=offset,
                                echo=lambda m: print(m, flush=True),
                                id_cache_dir=Path(rt.teacher_cache) / "ids")
            offset += prev.steps
            done.append(prev)
            protocol.report_stage_done(stage, offset, snapshot(done, tmp), source=prev.source,
                                       key=prev.key, steps=prev.steps)

        init = prev.checkpoint if prev is not None else None
        if "generation" in payload["stages"]:  # Table 2: the tokenizer feeds a generator
            source = init if init is not None else Path(cfg.generation.tokenizer)
            run_generation(cfg, source, teacher, work, tmp, payload, device, rt, offset, done)
            return
        tokenizer = load_model(init, device)[0].eval()
        val = build_val_dataset(cfg.data)  # never scans the training data
        images = val_batches(val, cfg.eval.batch_size, cfg.eval.max_images)
        # Floors (naive codecs with the tokenizer's / teacher's bits) and the teacher ceiling
        # are scored on the same images: every table places the arms between them (issue 9).
        bounds = build_bounds(cfg, rt.eval_cache)
        result = evaluate(tokenizer, teacher, images, cfg.eval, device=device,
                          cache_dir=rt.eval_cache, progress=False, decode_cfg=cfg.decode,
                          dataset_key=dataset_key(cfg), bounds=bounds)
        metrics = {**result.metrics, "skipped_images": images.skipped}  # left out, not scored
        with writing(tmp, "the trial's artifacts"):
            art = run_record.write_trial_artifacts(tmp / "artifacts", to_dict(cfg), payload,
                                                   metrics, result.unavailable, result.trace,
                                                   result.grids, init)
        protocol.report_final(metrics, art)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
