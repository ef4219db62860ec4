#!/usr/bin/env python3
"""Execute the analysis notebooks headless and log their outputs to MLflow.

    python analysis/render.py [NAME ...] [--tracking-uri URI] [--parent RUN_ID] [--out DIR]
                              [-p KEY=VALUE ...] [--no-log] [--timeout SECONDS]

NAME is a notebook of analysis/ (`table4_replace_ratio` or `analysis/table4_replace_ratio.py`);
none = all of them. Each jupytext percent-format notebook is read (jupytext), its `parameters`
cell is followed by an injected cell with `tracking_uri`, `parent`, `out_dir` and any
`-p KEY=VALUE` (values parsed as YAML scalars), and it is executed with nbclient on an
ipykernel of this interpreter (no kernelspec registration needed). Outputs go to DIR/NAME/ (default analysis/out/NAME/; emptied first): the executed
`NAME.ipynb`, the tables (`.csv`, `.md`), the figures (`.png` + `.axes.json`), `reading.md` and
`manifest.json`; then they are logged as artifacts `analysis/NAME/` of the parent run(s) the
notebook read (skip with --no-log).

`--parent` selects the parent run of the notebook's main spec (Figure 4: the `per_step_trace`
run; its 4b run is `-p parent_4b=RUN_ID`). A notebook whose runs are missing prints which spec
to run (`python experiments/run.py SPEC`); exit status 2 then, 1 for any other failure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from sftok import run_record

ANALYSIS = Path(__file__).resolve().parent
NOTEBOOKS = ["table3_sfvr_warmup", "table4_replace_ratio", "figure4_per_step",
             "figure8_step_sweep", "table1_reconstruction", "figures9_14_stage3_losses",
             "table5_compute", "table2_generation"]
# Notebooks that read no MLflow run (Table 5 reads a throughput JSON): they need no store.
NO_STORE = {"table5_compute"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def inject_parameters(nb, params: dict) -> None:
    """Insert a cell tagged `injected-parameters` after the cell tagged `parameters`."""
    import nbformat

    src = "# Parameters injected by analysis/render.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    for i, c in enumerate(nb.cells):
        if "parameters" in c.get("metadata", {}).get("tags", []):
            nb.cells.insert(i + 1, cell)
            return
    raise SystemExit(f"{nb.metadata.get('name', 'notebook')}: no cell tagged 'parameters'")


def this_interpreter_kernel_manager():
    """A KernelManager whose kernel is ipykernel on *this* interpreter (sys.executable), so a
    fresh venv needs no `ipykernel install`, and a user-registered `python3` kernelspec that
    points at another Python cannot run the notebooks with other packages."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import KernelManager

    class ThisInterpreterKernelManager(KernelManager):
        @property
        def kernel_spec(self):
            if self._kernel_spec is None:
                self._kernel_spec = KernelSpec(
                    argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    display_name=f"Python 3 ({sys.executable})", language="python",
                    metadata={"debugger": False})
            return self._kernel_spec

    return ThisInterpreterKernelManager


def execute(name: str, params: dict, out: Path, timeout: int) -> tuple[str, str]:
    """Run one notebook; returns (status, message) with status in ok / missing / error."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = jupytext.read(ANALYSIS / f"{name}.py")
    inject_parameters(nb, params)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            kernel_manager_class=this_interpreter_kernel_manager(),
                            resources={"metadata": {"path": str(ANALYSIS)}})
    status, message = "ok", ""
    try:
        client.execute()
    except CellExecutionError as e:
        ename, evalue = getattr(e, "ename", ""), ANSI.sub("", getattr(e, "evalue", "") or "")
        if ename == "RunsNotFound":
            status, message = "missing", evalue
        else:
            tail = "\n".join(ANSI.sub("", str(e)).strip().splitlines()[-15:])
            status, message = "error", f"{ename}: {evalue}\n{tail}"
    except Exception as e:  # noqa: BLE001 — kernel start-up or timeout: report, don't crash
        status, message = "error", f"{type(e).__name__}: {e}"
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out / f"{name}.ipynb")
    return status, message


def clear_outputs(out: Path) -> None:
    """Remove a previous run's outputs of one notebook (out = DIR/NAME), so that a failed or
    missing run does not leave the old tables and reading beside the new notebook."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()


def log_outputs(name: str, out: Path) -> list[str]:
    """Log out/ as artifacts `analysis/<name>/` of every parent run named in its manifest."""
    from mlflow.tracking import MlflowClient

    manifest = json.loads((out / "manifest.json").read_text())
    logged = []
    for spec, info in manifest.get("campaigns", {}).items():
        client = MlflowClient(tracking_uri=info["tracking_uri"])
        client.log_artifacts(info["parent_run_id"], str(out),
                             artifact_path=run_record.analysis_path(name))
        logged.append(f"{spec}:{info['parent_run_id']}")
    return logged


def parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"notebooks (default: all: "
                    f"{', '.join(NOTEBOOKS)})")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    ap.add_argument("--parent", default=None, help="parent run id of the notebook's spec "
                    "(default: the latest); needs exactly one NAME")
    ap.add_argument("--out", default=str(ANALYSIS / "out"), help="output root; NAME/ under it")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="extra notebook parameter, e.g. -p parent_4b=RUN_ID")
    ap.add_argument("--no-log", action="store_true", help="do not log outputs to MLflow")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = ap.parse_args(argv)

    names = [Path(n).stem for n in args.names] or NOTEBOOKS
    unknown = [n for n in names if not (ANALYSIS / f"{n}.py").exists() or n not in NOTEBOOKS]
    if unknown:
        ap.error(f"unknown notebook(s) {', '.join(unknown)}; known: {', '.join(NOTEBOOKS)}")
    if args.parent and len(names) != 1:
        ap.error("--parent names one spec's run: give exactly one NAME")

    os.environ.setdefault("MPLBACKEND", "Agg")  # inherited by the kernel
    sys.path.insert(0, str(ANALYSIS))
    from mlflow_data import RunsNotFound, client_for, resolve_uri

    uri = resolve_uri(args.tracking_uri)
    extra = {}
    for kv in args.param:
        if "=" not in kv:
            ap.error(f"-p expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        k = k.strip()
        # Run ids, URIs and paths stay strings (a run id of digits would parse as a number).
        extra[k] = v if k.startswith("parent") or k in ("tracking_uri", "out_dir") else \
            parse_value(v)

    try:  # a missing store: say so once, without starting kernels
        client_for(uri)
    except RunsNotFound as e:
        if not set(names) <= NO_STORE:
            print(f"[render] {e}", file=sys.stderr)
            return 2

    results = {}
    for name in names:
        out = Path(args.out).resolve() / name
        params = {"tracking_uri": uri, "out_dir": str(out), **extra}
        if args.parent:
            params["parent"] = args.parent
        t0 = time.time()
        clear_outputs(out)
        status, message = execute(name, params, out, args.timeout)
        dt = time.time() - t0
        if status == "ok":
            try:
                logged = [] if args.no_log else log_outputs(name, out)
            except Exception as e:  # noqa: BLE001 — report, go on with the other notebooks
                print(f"[render] {name}: ran ok in {dt:.1f}s -> {out}, but logging its outputs "
                      f"to MLflow FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                results[name] = "error"
                continue
            print(f"[render] {name}: ok in {dt:.1f}s -> {out}"
                  + (f" (logged to {', '.join(logged)})" if logged else ""))
        elif status == "missing":
            print(f"[render] {name}: runs missing —\n  " + message.replace("\n", "\n  "),
                  file=sys.stderr)
        else:
            print(f"[render] {name}: FAILED in {dt:.1f}s (partial notebook: "
                  f"{out / (name + '.ipynb')})\n{message}", file=sys.stderr)
        results[name] = status
    if any(s == "error" for s in results.values()):
        return 1
    return 2 if any(s == "missing" for s in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
