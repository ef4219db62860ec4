#!/usr/bin/env python3
"""Run an SFTok experiment spec: trials scheduled by Ray Tune, every trial an MLflow run.

    python experiments/run.py ablation_replace_ratio            # Table 4 on the `tiny` preset
    python experiments/run.py --list                            # the shipped specs
    python experiments/run.py SPEC --dry-run                    # print the trials, run nothing
    python experiments/run.py ui                                # MLflow UI on 127.0.0.1
    python experiments/run.py snapshot                          # dvc add mlruns

`python experiments/run.py --help` lists every option.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sftok_experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
