"""A trial's reconstruction evaluation: the tokenizer it trained, scored, and its artifacts.

Called by `trial.run_trial` in the trial process (one worker) and by every rank of a
data-parallel trial (`data_parallel.py`): the held-out batches are split over the ranks
(`val_batches(rank=, world_size=)`, `evaluate(workers=)`), every rank gets the metrics, and rank 0
alone writes the artifacts (`sftok.run_record.write_trial_artifacts`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sftok import run_record
from sftok.checkpoint import load_model
from sftok.config import ExperimentConfig, to_dict
from sftok.data import build_val_dataset, val_batches
from sftok.distributed import SINGLE, Workers
from sftok.evaluate import dataset_key, evaluate
from sftok.evaluate.bounds import build_bounds
from sftok.storage import writing
from sftok_experiments.protocol import Runtime


def evaluate_trial(cfg: ExperimentConfig, tokenizer_dir: Path, teacher, device,
                   rt: Runtime, payload: dict[str, Any], out: Path,
                   workers: Workers = SINGLE) -> dict[str, float]:
    """Score the tokenizer in `tokenizer_dir` on the held-out images (+ floors and ceiling) and
    write the run's artifacts into `out` (rank 0); returns the metrics (every rank)."""
    tokenizer = load_model(tokenizer_dir, device)[0].eval()
    val = build_val_dataset(cfg.data)  # never scans the training data
    images = val_batches(val, cfg.eval.batch_size, cfg.eval.max_images,
                         rank=workers.rank, world_size=workers.world_size)
    # Floors (naive codecs with the tokenizer's / teacher's bits) and the teacher ceiling are
    # scored on the same images: every table places the arms between them (issue 9).
    bounds = build_bounds(cfg, rt.eval_cache, workers=workers)
    result = evaluate(tokenizer, teacher, images, cfg.eval, device=device,
                      cache_dir=rt.eval_cache, progress=False, decode_cfg=cfg.decode,
                      dataset_key=dataset_key(cfg), bounds=bounds, workers=workers)
    # Left out, not scored: every rank's undecodable files.
    skipped = sum(workers.all_gather_object(images.skipped))
    metrics = {**result.metrics, "skipped_images": skipped}

    def write() -> None:
        with writing(out.parent, "the trial's artifacts"):  # a full disk: one line
            run_record.write_trial_artifacts(out, to_dict(cfg), payload, metrics,
                                             result.unavailable, result.trace, result.grids,
                                             tokenizer_dir)

    workers.on_main("writing the trial's artifacts", write)
    return metrics
