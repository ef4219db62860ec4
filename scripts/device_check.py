"""One prepared device check (issue 22): what a CUDA machine must show, in one command.

    python dev.py exec python scripts/device_check.py --out DIR        # a GPU box, every step
    python3 scripts/device_check.py --out $OUT                         # a GPU image, no venv
    python dev.py exec python scripts/device_check.py --device cpu --quick --out DIR  # rehearsal

Runs the steps below in order (the most valuable answers first), each in its own process under
its own time box, within one overall budget (`--budget`, default 420 s of steps: the whole run
stays under 8 minutes on one H100/H200 including start-up). A step that fails or times out is
recorded and the next one starts; a step whose packages are missing (Ray, MLflow, pydantic on a
bare GPU image) is skipped with the reason. Writes into --out, after every step and every 10 s
while one runs: `report.json` (schema: docs/device_check.md), `report.md` (the table a person
reads) and `device_check.log` (every step's output); a kill at any moment leaves a report.
Scratch (the campaign's MLflow store, work and cache dirs) goes to --work (default: a new temp
dir), never into --out. Without CUDA the check is the rehearsal: the same steps at `smoke`
size (about 2 minutes on 2 cores). `--list` prints the steps and their time boxes.

`analysis/table5_compute.py` renders Table 5 from the report: `python analysis/render.py
table5_compute -p benchmark_json=DIR/report.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from device_report import SCHEMA, annotate_throughput, render  # (the script dir, above)

RAY_STEP = ("ray", "mlflow", "pydantic", "yaml")


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    box: float  # seconds on CUDA
    quick_box: float  # seconds in the rehearsal (--quick)
    needs: tuple[str, ...] = ()  # importable modules it requires
    # In the rehearsal only: started at once and run beside the others (its CPU timings are
    # not measurements, and the Ray start-up would otherwise double the rehearsal's time).
    background_in_rehearsal: bool = False


STEPS = (
    Step("env", "environment: torch / CUDA, GPU and memory, bf16, TF32, packages, matmul rate",
         45, 30),
    Step("golden", "golden-equivalence tests on the device, fp32 and bf16", 90, 90,
         ("pytest",)),
    Step("gpu_path", "GPU path: host syncs per training step, fused AdamW, pinned batches, "
         "TF32, SDPA kernels, compile fallback", 60, 40),
    Step("throughput", "training throughput, peak memory, model FLOPs (eager; sftok-b, small)",
         150, 60),
    Step("decode", "8-step decode of sftok-b: images/s, cost against one decoder pass", 45, 30),
    Step("max_batch", "largest sftok-b stage-2 micro-batch that fits", 60, 30),
    Step("campaign", "smoke Table 4 campaign through Ray on GPU shares, placement from MLflow",
         120, 150, RAY_STEP, background_in_rehearsal=True),
    Step("ray_train", "one Ray Train trial: 1 worker on NCCL (2 on two GPUs)", 90, 60,
         RAY_STEP),
    Step("compile", "torch.compile throughput (the same rows, compiled)", 200, 40),
)
MIN_START = 10.0  # a step is not started with less time left in the budget


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _git() -> dict | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
        return {"commit": sha or None, "dirty": bool(dirty)} if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


class Check:
    """The run: options, the report being filled, the output files."""

    def __init__(self, args: argparse.Namespace, device: str, quick: bool, note: str | None):
        self.args, self.device, self.quick = args, device, quick
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="sftok-device-check-")).resolve()
        (self.work / "steps").mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "device_check.log"
        self.log_path.write_text("")
        self.t0 = time.time()
        scale = args.box_scale
        default = (300.0 if quick else 420.0) * scale
        self.budget = float(args.budget if args.budget is not None else default)
        selected = set(args.steps.split(",")) if args.steps else None
        self.steps = [s for s in STEPS if selected is None or s.name in selected]
        self.running: list[_Running] = []  # started steps not yet waited for
        self.report = {
            "schema": SCHEMA, "command": " ".join(shlex.quote(a) for a in sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "updated": None,
            "finished": False, "wall_s": 0.0, "mode": "rehearsal" if quick and device == "cpu"
            else ("quick" if quick else "full"), "device": device, "quick": quick,
            "note": note, "budget_s": self.budget, "git": _git(), "work_dir": str(self.work),
            "python": sys.executable,
            "steps": [{"name": s.name, "title": s.title, "status": "pending", "reason": None,
                       "box_s": (s.quick_box if quick else s.box) * scale, "seconds": None,
                       "result": None} for s in self.steps],
            "throughput": {"device_name": None, "rows": []}}

    # --- the report ---------------------------------------------------------------------

    def write(self) -> None:
        r = self.report
        r["updated"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        r["wall_s"] = time.time() - self.t0
        annotate_throughput(r)
        for name, text in (("report.json", json.dumps(r, indent=1, default=str)),
                           ("report.md", render(r))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def entry(self, name: str) -> dict:
        return next(e for e in self.report["steps"] if e["name"] == name)

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    # --- running the steps ----------------------------------------------------------------

    def run(self) -> None:
        early = {}
        if self.quick:  # the rehearsal starts its slow Ray step at once, beside the others
            for step in self.steps:
                if step.background_in_rehearsal and self.runnable(step):
                    early[step.name] = self.start(step, self.entry(step.name)["box_s"],
                                                  background=True)
        for step in self.steps:
            if step.name in early:
                self.wait(early[step.name])
                continue
            reason = self.blocked(step)
            if reason:
                self.finish(self.entry(step.name), "skipped", reason)
                continue
            self.wait(self.start(step, min(self.entry(step.name)["box_s"], self.left())))

    def blocked(self, step: Step) -> str | None:
        """Why `step` cannot start now (missing packages, no time left), or None."""
        missing = [m for m in step.needs if not _importable(m)]
        if missing:
            return f"needs {', '.join(missing)} (not installed in {sys.executable})"
        if self.left() < MIN_START:
            return f"out of the time budget ({self.budget:.0f} s)"
        return None

    def runnable(self, step: Step) -> bool:
        return self.blocked(step) is None

    def finish(self, e: dict, status: str, reason: str | None = None,
               seconds: float | None = None) -> None:
        e.update(status=status, reason=reason, seconds=seconds)
        self.write()
        took = f"{seconds:6.1f} s" if seconds is not None else "      -"
        print(f"[{time.time() - self.t0:5.0f} s] {e['name']:<10} {status:<8} {took}  "
              f"{reason or ''}", flush=True)

    def start(self, step: Step, box: float, background: bool = False) -> _Running:
        """Start `step` in its own process (session) under its time box."""
        results = self.work / "steps" / f"{step.name}.json"
        results.unlink(missing_ok=True)
        state = {"device": self.device, "quick": self.quick, "work": str(self.work),
                 "results": str(results), "deadline": time.time() + box - 3,
                 "threads": self.args.threads, "driver": os.getpid()}
        state_path = self.work / "steps" / f"{step.name}.state.json"
        state_path.write_text(json.dumps(state))
        e = self.entry(step.name)
        e["status"] = "running"
        self.write()
        # A background step logs apart and is appended to the main log when it ends.
        log_path = self.work / "steps" / f"{step.name}.log" if background else self.log_path
        log = open(log_path, "a")  # noqa: SIM115 (held by the _Running until its wait ends)
        log.write(f"\n===== {step.name} (time box {box:.0f} s) =====\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "experiments"),
                                               os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen([sys.executable, str(HERE / "device_check.py"), "--run-step",
                                 step.name, "--state", str(state_path)], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        running = _Running(step, e, proc, time.time(), box, results, log, log_path)
        self.running.append(running)
        return running

    def tend(self) -> None:
        """Note when started steps end, and kill those past their time box."""
        for r in self.running:
            if r.ended is None and r.proc.poll() is not None:
                r.ended = time.time()
            elif r.ended is None and time.time() - r.t0 > r.box:
                _kill(r.proc)
                r.ended, r.timed_out = time.time(), True

    def wait(self, run: _Running) -> None:
        """Wait for a started step (killing it at its time box), then record its outcome."""
        last_write = time.time()
        while run.ended is None:
            time.sleep(0.5)
            self.tend()
            if time.time() - last_write > 10:  # partial answers reach the report
                run.entry["result"], last_write = _read(run.results), time.time()
                self.write()
        seconds, timed_out = run.ended - run.t0, run.timed_out
        self.running.remove(run)
        run.log.close()
        if run.log_path != self.log_path:
            with open(self.log_path, "a") as log:
                log.write(run.log_path.read_text())
        run.entry["result"] = _read(run.results)
        result = run.entry["result"] or {}
        if timed_out:
            self.finish(run.entry, "timeout", f"killed at its time box ({run.box:.0f} s); "
                                              "partial results kept", seconds)
        elif "_skipped" in result:
            self.finish(run.entry, "skipped", result["_skipped"], seconds)
        elif run.proc.returncode != 0:
            self.finish(run.entry, "failed", result.get("_error") or
                        f"exit code {run.proc.returncode} (see device_check.log)", seconds)
        else:
            self.finish(run.entry, "ok", None, seconds)

    def stop_all(self) -> None:
        for run in list(self.running):
            if run.proc.poll() is None:
                _kill(run.proc)


@dataclass
class _Running:
    step: Step
    entry: dict
    proc: subprocess.Popen
    t0: float
    box: float
    results: Path
    log: object
    log_path: Path
    ended: float | None = None
    timed_out: bool = False


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _kill(proc: subprocess.Popen) -> None:
    """End the step's whole process group (its own children too: pytest, Ray)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--out", help="where report.json, report.md and device_check.log go")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available, else the CPU rehearsal")
    p.add_argument("--quick", action="store_true",
                   help="every step at `smoke` size (implied on CPU)")
    p.add_argument("--budget", type=float, help="seconds for all steps (default 420; 300 "
                                                "with --quick)")
    p.add_argument("--steps", help="comma-separated subset of the steps, in their order")
    p.add_argument("--work", help="scratch directory (default: a new temp dir)")
    p.add_argument("--threads", type=int, help="torch CPU threads per step (default: all)")
    p.add_argument("--box-scale", type=float, default=1.0, metavar="F",
                   help="multiply every time box and the default budget by F (a slow or "
                        "shared machine; the test suite's rehearsal uses 4)")
    p.add_argument("--list", action="store_true", help="print the steps and time boxes")
    p.add_argument("--run-step", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.run_step:  # inside a step's own process
        from device_steps import run_step

        return run_step(args.run_step, Path(args.state))
    if args.list:
        print(f"{'step':<11}{'CUDA box':>9}{'quick box':>10}  what")
        for s in STEPS:
            needs = f" [needs {', '.join(s.needs)}]" if s.needs else ""
            print(f"{s.name:<11}{s.box:>8.0f}s{s.quick_box:>9.0f}s  {s.title}{needs}")
        return 0
    if not args.out:
        print("error: --out DIR is required (where the report goes)", file=sys.stderr)
        return 2
    if args.box_scale <= 0:
        print("error: --box-scale must be > 0", file=sys.stderr)
        return 2
    unknown = set(args.steps.split(",")) - {s.name for s in STEPS} if args.steps else set()
    if unknown:
        print(f"error: unknown step(s) {', '.join(sorted(unknown))}; known: "
              f"{', '.join(s.name for s in STEPS)}", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print(f"error: --device cuda but CUDA is not available to torch {torch.__version__} "
              "here (no GPU or driver, or a CPU-only build); use --device cpu --quick for the "
              "rehearsal", file=sys.stderr)
        return 2
    device = "cuda" if (args.device == "cuda" or (args.device == "auto" and cuda)) else "cpu"
    note = None
    if device == "cpu" and not args.quick:
        note = ("no CUDA here: the CPU rehearsal at smoke size" if args.device == "auto"
                else "CPU: the rehearsal at smoke size (full sizes need a GPU)")
    check = Check(args, device, args.quick or device == "cpu", note)
    print(f"device check: {device}{' (quick)' if check.quick else ''}, budget "
          f"{check.budget:.0f} s, out {check.out}, work {check.work}", flush=True)

    def on_term(signum, frame):  # end the running steps; the report says where it stopped
        check.stop_all()
        check.report["interrupted"] = signal.Signals(signum).name
        check.write()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        check.run()
    except KeyboardInterrupt:
        check.stop_all()
        check.report["interrupted"] = "SIGINT"
        check.write()
        return 130
    check.report["finished"] = True
    check.write()
    print((check.out / "report.md").read_text(), flush=True)
    bad = [e["name"] for e in check.report["steps"] if e["status"] in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
