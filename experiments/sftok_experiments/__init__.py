"""Orchestration of SFTok experiments: specs -> Ray Tune trials -> MLflow runs.

- `spec.py`        the YAML schema (strict pydantic models) and `load_spec()`
- `expand.py`      a spec (+ CLI options) -> the trials, each with a resolved ExperimentConfig
- `protocol.py`    how a trial and the driver talk: the trial's input, its reports, their decoding
- `trial.py`       the Ray Tune trial function: stage pipeline -> evaluate -> artifacts
- `generation.py`  the `generation` stage of a trial (Table 2)
- `stage_store.py` content-addressed stage results shared by the trials
- `placement.py`   where a trial runs (its device) and the record of it
- `tracking.py`    the single MLflow writer: the parent run, and a tune.Callback for the children
- `progress.py`    a trial's progress lines; `summary.py` the invocation's result and table
- `campaign.py`    one invocation: validate, teacher (stage 0), Ray Tune, summary, resume
- `cli.py`         `python experiments/run.py ...`
- `dvc.py`         `python experiments/run.py snapshot` (DVC-version the MLflow store)

What the runner writes into MLflow is laid out in `sftok.run_record` (the notebooks read it from
there too).

This package never imports Ray or MLflow at module import time of `spec`/`expand`, so specs
are validated (and `--dry-run` / `--list` answer) before anything heavy starts.
"""
from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent
ROOT = EXPERIMENTS_DIR.parent
SPECS_DIR = EXPERIMENTS_DIR / "specs"
