"""`python experiments/run.py snapshot`: version the MLflow store with DVC (`mlruns.dvc`).

    python experiments/run.py snapshot                 # dvc add mlruns -> mlruns.dvc (+ local cache)
    python experiments/run.py snapshot --remote NAME   # ... then dvc push -r NAME
    git add mlruns.dvc && git commit -m "results: <campaign>"

The repository carries a DVC project (`.dvc/config`, `.dvcignore`) that was written by hand
rather than by `dvc init`, so nothing is staged in git behind your back. Configure a remote
once with `dvc remote add -d store /path/or/s3://bucket/...`; restore a snapshot elsewhere
with `git checkout <commit> mlruns.dvc && dvc pull` (or `dvc checkout` from the local cache).
Snapshot between campaigns: the SQLite file must not be mid-write.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from sftok_experiments import ROOT


def _dvc() -> list[str]:
    exe = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    if Path(exe).exists():
        return [exe]
    return [sys.executable, "-m", "dvc"]


def snapshot(store: str = "mlruns", remote: str | None = None, echo=print) -> int:
    path = (ROOT / store) if not Path(store).is_absolute() else Path(store)
    if not path.exists():
        echo(f"snapshot: {path} does not exist; run a spec first", file=sys.stderr)
        return 2
    if not (ROOT / ".dvc").is_dir():
        echo("snapshot: no DVC project here (.dvc/ missing); run `dvc init` first",
             file=sys.stderr)
        return 2
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    cmds = [_dvc() + ["add", str(rel)]]
    if remote:
        cmds.append(_dvc() + ["push", "-r", remote, f"{rel}.dvc"])
    for cmd in cmds:
        echo("$ " + " ".join(cmd))
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc:
            return rc
    echo(f"snapshot: {rel}.dvc written; commit it with git to record this state of the store")
    return 0
