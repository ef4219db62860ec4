"""The `generation` stage of a trial (paper Table 2): tokens -> generator -> samples -> gFID.

Called by `trial.run_trial` after the tokenizer stages (or alone, with `generation.tokenizer`),
in the trial process (`run_generation`) or, data-parallel, steps 1-2 on every Ray Train worker and
3-4 on rank 0 (`data_parallel.py`):
  1. pre-tokenise the training data (+ flips) with the finished tokenizer, cached under
     `<cache>/eval/tokens/` keyed by the tokenizer checkpoint and the data;
  2. train the generator (resumable, `train/generation/<name>` metrics, a stage_done report);
  3. sample class-balanced images and score them (`sftok.generation.evaluate`);
  4. artifacts (`sftok.run_record`): config.json, eval.json, generation.json (token cache
     record: assignment used, classes, grid rows), sweep.csv, grids/samples.png (one row per
     class) and grids/samples_class<c>.png, checkpoint/ (the generator, EMA weights).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sftok import run_record
from sftok.checkpoint import load_model
from sftok.config import to_dict
from sftok.data import build_train_dataset, val_batches
from sftok.distributed import SINGLE, Workers
from sftok.generation.data import class_names, heldout_dataset, train_data_key
from sftok.generation.evaluate import GRID_PAD, evaluate_generation
from sftok.generation.pretokenize import cached_tokens
from sftok.generation.train import train_generator
from sftok_experiments import protocol
from sftok_experiments.stage_store import TRAINED, StageOutcome, snapshot

SWEEP_HEAD = ["schedule", "scale", "temperature"]  # sweep.csv's first columns


def run_generation(cfg, tokenizer_dir: Path, teacher, work: Path, tmp: Path,
                   payload: dict[str, Any], device, rt: protocol.Runtime,
                   step_offset: int, done: list) -> None:
    """The generation stage in the trial process (one worker). done: the trial's finished
    `StageOutcome`s (for the Ray checkpoint snapshot)."""
    live, _ = protocol.stage_reporters("generation")
    tokenizer = load_model(tokenizer_dir, device)[0].eval()
    train_ds = build_train_dataset(cfg.data)
    tokens, hit, res = train_generation(cfg, tokenizer_dir, tokenizer, train_ds, work, device,
                                        rt, live, step_offset)
    report_generation_done(res.checkpoint, res.steps, step_offset, done, tmp)
    metrics = generation_artifacts(cfg, tokenizer_dir, tokenizer, train_ds, teacher, tokens, hit,
                                   res.checkpoint, payload, device, rt, tmp / "artifacts")
    protocol.report_final(metrics, tmp / "artifacts")


def train_generation(cfg, tokenizer_dir: Path, tokenizer, train_ds, work: Path, device,
                     rt: protocol.Runtime, callback, step_offset: int,
                     workers: Workers = SINGLE):
    """Steps 1-2 (on every rank of `workers`): the token cache (tokenised by rank 0 once) and the
    generator, trained resumably in work/generation -> (tokens, cache hit, GeneratorResult).
    tokenizer: loaded from tokenizer_dir; train_ds: `build_train_dataset(cfg.data)`."""
    g = cfg.generation
    tokens, hit = cached_tokens(tokenizer, tokenizer_dir, train_ds,
                                train_data_key(cfg.data), Path(rt.eval_cache), flips=g.flips,
                                assign=g.assign, batch_size=g.eval.batch_size, device=device,
                                workers=workers)
    res = train_generator(cfg, tokens, work / "generation", callback=callback, resume=True,
                          step_offset=step_offset, workers=workers)
    return tokens, hit, res


def report_generation_done(checkpoint: Path, steps: int, step_offset: int, done: list,
                           tmp: Path) -> None:
    """The generation stage's `stage_done` report (in the trial process). Not
    content-addressed (trained in work/generation): snapshotted without a key."""
    done.append(StageOutcome("generation", "", checkpoint, steps, TRAINED))
    protocol.report_stage_done("generation", step_offset + steps, snapshot(done, tmp))


def generation_artifacts(cfg, tokenizer_dir: Path, tokenizer, train_ds, teacher, tokens,
                         hit: bool, generator_dir: Path, payload: dict[str, Any], device,
                         rt: protocol.Runtime, art: Path) -> dict[str, float]:
    """Steps 3-4 (one process): sample, score and write the artifacts into `art`; returns the
    metrics."""
    g = cfg.generation
    data_key = train_data_key(cfg.data)
    generator = load_model(generator_dir, device)[0].eval()
    e = g.eval
    result = evaluate_generation(
        generator, tokenizer, teacher, g, cfg.decode, tokens,
        reference_images=val_batches(train_ds, e.batch_size, e.max_reference_images),
        heldout_images=val_batches(heldout_dataset(cfg.data), e.batch_size,
                                   e.max_heldout_images),
        device=device, cache_dir=Path(rt.eval_cache),
        reference_key=f"{data_key}-{e.max_reference_images}")
    run_record.write_trial_artifacts(art, to_dict(cfg), payload, result.metrics,
                                     result.unavailable, [], {}, generator_dir)
    record = {"tokenizer": str(tokenizer_dir), "tokens": tokens.meta, "token_cache_hit": hit,
              "num_token_rows": len(tokens), "classes": tokens.classes(),
              "grid_classes": result.grid_classes, "sampling": to_dict(g.sampling),
              "class_names": {str(c): n for c, n in class_names(cfg.data, train_ds).items()
                              if c in tokens.classes()}}
    run_record.write_json(art / run_record.GENERATION_JSON, record, default=str)
    if result.sweep:
        cols = SWEEP_HEAD + sorted({k for r in result.sweep for k in r} - set(SWEEP_HEAD))
        run_record.write_csv(art / run_record.SWEEP_CSV, result.sweep, cols)
    if result.grid is not None:
        write_class_grids(art, result.grid, result.grid_classes)
    return result.metrics


def write_class_grids(art: Path, grid, classes: list[int]) -> None:
    """The whole grid (one row per class) and one image per class row."""
    run_record.write_png(art / run_record.samples_grid(), grid)
    rows, pad = len(classes), GRID_PAD
    h = (grid.shape[0] - (rows + 1) * pad) // rows
    for i, c in enumerate(classes):
        y = pad + i * (h + pad)
        run_record.write_png(art / run_record.samples_grid(c), grid[y - pad:y + h + pad])
