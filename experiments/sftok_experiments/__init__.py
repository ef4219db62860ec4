"""Orchestration of SFTok experiments: specs -> Ray Tune trials -> MLflow runs.

- `spec.py`      the YAML schema (strict pydantic models) and `load_spec()`
- `expand.py`    a spec (+ CLI options) -> the list of trials, each with a resolved ExperimentConfig
- `trial.py`     the Ray Tune trial function: stage pipeline (train_stage) -> evaluate -> artifacts
- `tracking.py`  the single MLflow writer: a tune.Callback in the driver (parent/child runs)
- `campaign.py`  one invocation: validate, teacher (stage 0), Ray Tune, summary, resume
- `cli.py`       `python experiments/run.py ...`
- `dvc.py`       `python experiments/run.py snapshot` (DVC-version the MLflow store)

This package never imports Ray or MLflow at module import time of `spec`/`expand`, so specs
are validated (and `--dry-run` / `--list` answer) before anything heavy starts.
"""
from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent
ROOT = EXPERIMENTS_DIR.parent
SPECS_DIR = EXPERIMENTS_DIR / "specs"
