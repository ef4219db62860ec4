"""The `generation` stage of a trial (paper Table 2): tokens -> generator -> samples -> gFID.

Called by `trial.run_trial` after the tokenizer stages (or alone, with `generation.tokenizer`):
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
    """done: the trial's finished `StageOutcome`s (for the Ray checkpoint snapshot)."""
    g = cfg.generation
    tokenizer = load_model(tokenizer_dir, device)[0].eval()
    train_ds = build_train_dataset(cfg.data)
    data_key = train_data_key(cfg.data)
    cache = Path(rt.eval_cache)
    tokens, hit = cached_tokens(tokenizer, tokenizer_dir, train_ds, data_key, cache,
                                flips=g.flips, assign=g.assign,
                                batch_size=g.eval.batch_size, device=device)

    live, _ = protocol.stage_reporters("generation")
    res = train_generator(cfg, tokens, work / "generation", callback=live, resume=True,
                          step_offset=step_offset)
    # Not content-addressed (trained in work/generation): snapshotted without a key.
    done.append(StageOutcome("generation", "", res.checkpoint, res.steps, TRAINED))
    protocol.report_stage_done("generation", step_offset + res.steps, snapshot(done, tmp))

    generator = load_model(res.checkpoint, device)[0].eval()
    e = g.eval
    result = evaluate_generation(
        generator, tokenizer, teacher, g, cfg.decode, tokens,
        reference_images=val_batches(train_ds, e.batch_size, e.max_reference_images),
        heldout_images=val_batches(heldout_dataset(cfg.data), e.batch_size,
                                   e.max_heldout_images),
        device=device, cache_dir=cache, reference_key=f"{data_key}-{e.max_reference_images}")
    art = run_record.write_trial_artifacts(tmp / "artifacts", to_dict(cfg), payload,
                                           result.metrics, result.unavailable, [], {},
                                           res.checkpoint)
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
    protocol.report_final(result.metrics, art)


def write_class_grids(art: Path, grid, classes: list[int]) -> None:
    """The whole grid (one row per class) and one image per class row."""
    run_record.write_png(art / run_record.samples_grid(), grid)
    rows, pad = len(classes), GRID_PAD
    h = (grid.shape[0] - (rows + 1) * pad) // rows
    for i, c in enumerate(classes):
        y = pad + i * (h + pad)
        run_record.write_png(art / run_record.samples_grid(c), grid[y - pad:y + h + pad])
