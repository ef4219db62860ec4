"""The `generation` stage of a trial (paper Table 2): tokens -> generator -> samples -> gFID.

Called by `trial.run_trial` after the tokenizer stages (or alone, with `generation.tokenizer`):
  1. pre-tokenise the training data (+ flips) with the finished tokenizer, cached under
     `<cache>/eval/tokens/` keyed by the tokenizer checkpoint and the data;
  2. train the generator (resumable, `train/generation/<name>` metrics, a stage_done report);
  3. sample class-balanced images and score them (`sftok.generation.evaluate`);
  4. artifacts: config.json, eval.json, generation.json (token cache record: assignment used,
     classes, grid rows), sweep.csv, grids/samples.png (one row per class) and
     grids/samples_class<c>.png, checkpoint/ (the generator, EMA weights).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

GRID_FILE = "samples.png"


def run_generation(cfg, tokenizer_dir: Path, teacher, work: Path, tmp: Path,
                   payload: dict[str, Any], device, runtime: dict[str, Any],
                   step_offset: int, done: list) -> None:
    """done: the trial's finished `StageOutcome`s (for the Ray checkpoint snapshot)."""
    from sftok.config import to_dict
    from sftok.data import build_train_dataset, val_batches
    from sftok.generation.data import class_names, heldout_dataset, train_data_key
    from sftok.generation.evaluate import evaluate_generation
    from sftok.generation.pretokenize import cached_tokens
    from sftok.generation.train import train_generator
    from sftok_experiments.trial import (
        _load_tokenizer,
        _snapshot,
        report_final,
        report_stage_done,
        report_train,
        write_artifacts,
    )

    g = cfg.generation
    tokenizer = _load_tokenizer(tokenizer_dir, device)
    train_ds = build_train_dataset(cfg.data)
    data_key = train_data_key(cfg.data)
    cache = Path(runtime["eval_cache"])
    tokens, hit = cached_tokens(tokenizer, tokenizer_dir, train_ds, data_key, cache,
                                 flips=g.flips, assign=g.assign,
                                 batch_size=g.eval.batch_size, device=device)

    def callback(step: int, metrics: dict[str, float]) -> None:
        report_train("generation", step, metrics)

    res = train_generator(cfg, tokens, work / "generation", callback=callback, resume=True,
                          step_offset=step_offset)
    from sftok_experiments.stage_store import TRAINED, StageOutcome

    # Not content-addressed (trained in work/generation): snapshotted without a key.
    done.append(StageOutcome("generation", "", res.checkpoint, res.steps, TRAINED))
    report_stage_done("generation", step_offset + res.steps, _snapshot(done, tmp))

    generator = _load_tokenizer(res.checkpoint, device)  # any sftok checkpoint, in eval()
    e = g.eval
    result = evaluate_generation(
        generator, tokenizer, teacher, g, cfg.decode, tokens,
        reference_images=val_batches(train_ds, e.batch_size, e.max_reference_images),
        heldout_images=val_batches(heldout_dataset(cfg.data), e.batch_size,
                                   e.max_heldout_images),
        device=device, cache_dir=cache, reference_key=f"{data_key}-{e.max_reference_images}")
    art = write_artifacts(tmp / "artifacts", to_dict(cfg), payload, result.metrics,
                          result.unavailable, [], {}, res.checkpoint)
    record = {"tokenizer": str(tokenizer_dir), "tokens": tokens.meta, "token_cache_hit": hit,
              "num_token_rows": len(tokens), "classes": tokens.classes(),
              "grid_classes": result.grid_classes, "sampling": to_dict(g.sampling),
              "class_names": {str(c): n for c, n in class_names(cfg.data, train_ds).items()
                              if c in tokens.classes()}}
    (art / "generation.json").write_text(json.dumps(record, indent=1, default=str))
    if result.sweep:
        head = ["schedule", "scale", "temperature"]
        cols = head + sorted({k for r in result.sweep for k in r} - set(head))
        with open(art / "sweep.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(result.sweep)
    if result.grid is not None:
        _write_grids(art / "grids", result.grid, result.grid_classes)
    report_final(result.metrics, art)


def _write_grids(out: Path, grid, classes: list[int]) -> None:
    """The whole grid (one row per class) and one image per class row."""
    from PIL import Image

    from sftok.generation.evaluate import GRID_PAD as pad

    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out / GRID_FILE)
    rows = len(classes)
    h = (grid.shape[0] - (rows + 1) * pad) // rows
    for i, c in enumerate(classes):
        y = pad + i * (h + pad)
        Image.fromarray(grid[y - pad:y + h + pad]).save(out / f"samples_class{c}.png")
