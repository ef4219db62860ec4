"""How long `--dry-run` of a large grid takes, and how much memory (issue 21; not a test).

Writes a spec with an A × B grid (by default 100 × 100 = 10,000 trials: the stage-2 learning
rate generated as 1e-5 · i — so 3e-05 comes out as 3.0000000000000004e-05 — times the
replacement ratio), runs `python experiments/run.py SPEC --dry-run` on it in a child process and
prints its wall and CPU time, peak resident memory, the lines it printed and the machine's load average
before and after (timings on a shared machine compare only under the same load).

    python scripts/bench_dry_run.py                       # 100 x 100
    python scripts/bench_dry_run.py --grid 100 100 --verbose --repeat 3
    python scripts/bench_dry_run.py --checkout /tmp/old-clone     # the same, older code
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def grid_spec(path: Path, a: int, b: int) -> Path:
    doc = {"name": f"dry_run_{a}x{b}", "reproduces": "none (benchmark)", "preset": "tiny",
           "stages": ["stage1", "stage2"], "overrides": {"train.stage2.replacement": "sfvr"},
           "arms": {"grid": {"train.stage2.optim.lr": [1e-5 * i for i in range(1, a + 1)],
                             "train.stage2.replace_ratio": [round(i / b, 4)
                                                            for i in range(1, b + 1)]}},
           "seeds": 1}  # a dry run never asks for --yes: no max_trials needed
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_once(spec: Path, work: Path, verbose: bool, checkout: Path = ROOT
              ) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, peak RSS in KiB, stdout) of one dry run in a child
    process (CPU time varies less than wall time on a loaded machine), with the code of
    `checkout` (another clone: the same command before a change)."""
    cmd = [sys.executable, str(checkout / "experiments" / "run.py"), str(spec), "--dry-run",
           "--work-dir", str(work / "runs"), "--cache-dir", str(work / "cache")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd + (["--verbose"] if verbose else []), stdout=subprocess.PIPE,
                             text=True, env=env)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest so far
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the dry run failed (exit {os.waitstatus_to_exitcode(status)})")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=int, nargs=2, default=(100, 100), metavar=("A", "B"))
    p.add_argument("--verbose", action="store_true", help="list every trial (--verbose)")
    p.add_argument("--repeat", type=int, default=1, help="dry runs, one after the other")
    p.add_argument("--checkout", type=Path, default=ROOT,
                   help="run the dry run with the code of this clone (default: this one)")
    a = p.parse_args()
    n = a.grid[0] * a.grid[1]
    with tempfile.TemporaryDirectory(prefix="sftok-dry-run-") as tmp:
        spec = grid_spec(Path(tmp) / "grid.yaml", *a.grid)
        for _ in range(a.repeat):
            load_before = os.getloadavg()[0]
            wall, cpu, rss, out = run_once(spec, Path(tmp), a.verbose, a.checkout.resolve())
            print(f"dry run of {n:,} trials ({'--verbose' if a.verbose else 'default'}, "
                  f"{a.checkout.resolve()}): "
                  f"wall {wall:.2f} s (CPU {cpu:.2f} s), peak RSS {rss / 1024:.0f} MiB, {out.count(chr(10)):,} "
                  f"lines printed; load average {load_before:.2f} -> {os.getloadavg()[0]:.2f} "
                  f"on {os.cpu_count()} CPUs", flush=True)


if __name__ == "__main__":
    main()
