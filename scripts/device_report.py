"""report.md of `scripts/device_check.py`: one table of the steps, then a section per answer.

Also `annotate_throughput`: gathers the throughput rows of the `throughput` and `compile` steps
into the report's "throughput" record (the schema of `scripts/benchmark.py --json`, which
`analysis/table5_compute.py` reads), each row with its achieved TFLOP/s and model FLOP
utilisation against the datasheet bf16 peak and against the matmul rate measured in `env`.
Standard library only (the driver imports this module before anything heavy).
"""
from __future__ import annotations

SCHEMA = "sftok-device-check/1"
# report.json: these top-level keys, one entry per step (STEP_KEYS) in the driver's order,
# and each finished step's result with at least RESULT_KEYS[step] (docs/device_check.md).
REPORT_KEYS = ("schema", "command", "started", "updated", "finished", "wall_s", "mode",
               "device", "quick", "note", "budget_s", "git", "work_dir", "python", "steps",
               "throughput")
# The placement.* tags (experiments/sftok_experiments/placement.py, prefix dropped) shown per
# trial, in this order (the rest stay in report.json).
DEVICE_TAG, GPU_MODEL_TAG = "device", "gpu_model"
PLACEMENT_SHOWN = (DEVICE_TAG, GPU_MODEL_TAG, "gpu_share", "gpu_slot", "ray_gpu_ids",
                   "cuda_visible_devices", "node")
STEP_KEYS = ("name", "title", "status", "reason", "box_s", "seconds", "result")
STATUSES = ("pending", "running", "ok", "failed", "timeout", "skipped")
RESULT_KEYS = {
    "env": ("python", "torch", "cuda", "cudnn", "cuda_available", "gpus", "bf16_supported",
            "tf32", "packages", "weights", "datasheet_bf16_tflops", "nvidia_smi", "matmul"),
    "golden": ("fp32", "bf16", "run"),
    "gpu_path": ("tf32", "steps", "pinned_batches", "sdpa", "compile_fallback"),
    "throughput": ("rows",),
    "decode": ("runs",),
    "max_batch": ("stage", "preset", "largest_ok", "smallest_failed", "stopped", "probes"),
    "campaign": ("run", "trials"),
    "ray_train": ("runs",),
    "compile": ("rows",),
}


def _result(report: dict, name: str) -> dict:
    e = next((e for e in report["steps"] if e["name"] == name), None)
    return (e or {}).get("result") or {}


def annotate_throughput(report: dict) -> None:
    env = _result(report, "env")
    gpus = env.get("gpus") or []
    report["throughput"]["device_name"] = gpus[0]["name"] if (
        gpus and report["device"] == "cuda") else report["device"]
    measured = (env.get("matmul") or {}).get("tflops")
    datasheet = env.get("datasheet_bf16_tflops")
    rows = []
    for step in ("throughput", "compile"):
        for row in _result(report, step).get("rows", []):
            row = dict(row)
            flops = row.get("model_flops")
            if flops is None:  # compiled rows: the same model FLOPs as the eager row
                flops = next((r.get("model_flops") for r in rows if r["preset"] == row["preset"]
                              and r["stage"] == row["stage"] and r.get("model_flops")), None)
                row["model_flops"] = flops
            tflops = flops / row["s_per_step"] / 1e12 if flops else None
            row["achieved_tflops"] = tflops
            bf16 = row.get("precision") == "bf16"
            row["mfu_datasheet"] = tflops / datasheet if tflops and datasheet and bf16 else None
            row["mfu_measured"] = tflops / measured if tflops and measured else None
            rows.append(row)
    report["throughput"]["rows"] = rows


# --------------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------------


def _f(x, fmt: str = ".3g", none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


# --------------------------------------------------------------------------------------------
# one line per step (the "answer" column)
# --------------------------------------------------------------------------------------------


def _env_line(r: dict) -> str:
    gpus = r.get("gpus") or []
    where = (", ".join(f"{g['name']} {g['memory_gib']:.0f} GiB (sm {g['capability']})"
                       for g in gpus) if gpus else f"CPU, {r.get('cpus')} cores")
    m = r.get("matmul") or {}
    mm = (f"; matmul {m['dtype']} {m['n']}³: {m['tflops']:.3g} TFLOP/s" if m else "")
    sheet = r.get("datasheet_bf16_tflops")
    return (f"torch {r.get('torch', '?')} (CUDA {r.get('cuda')}), {where}, bf16 "
            f"{ {True: 'yes', False: 'NO', None: 'n/a'}[r.get('bf16_supported')] }{mm}"
            + (f" (datasheet {sheet:.0f})" if sheet else ""))


def _golden_line(r: dict) -> str:
    parts = []
    for p in ("fp32", "bf16"):
        g = r.get(p)
        if not g:
            continue
        worst = max((t["error"] / t["tolerance"] for t in g["tensors"]
                     if t.get("tolerance")), default=None)
        parts.append(f"{p} {g['passed']} passed / {g['failed']} failed"
                     + (f" (worst error {worst:.2g} of its tolerance)" if worst is not None
                        else ""))
    return "; ".join(parts)


def _gpu_path_line(r: dict) -> str:
    steps = r.get("steps") or []
    syncs = ", ".join(f"{s['stage']} {sum((s['cuda_syncs'] or {}).values())}"
                      if s.get("cuda_syncs") is not None else f"{s['stage']} n/a"
                      for s in steps)
    reads = sum(len(s["library_reads"]) for s in steps)
    fused = all(s["fused_adamw"] for s in steps) if steps else None
    sdpa = "; ".join(f"{a['preset']}: {', '.join(a['dispatched']) or '?'}"
                     for a in r.get("sdpa") or [])
    fb = r.get("compile_fallback") or {}
    return (f"CUDA syncs per step: {syncs}; library host reads: {reads}; fused AdamW: "
            f"{fused}; pinned: {r.get('pinned_batches')}; attention: {sdpa}; compile "
            f"fallback: {fb.get('warnings')} warning(s)")


def _rows_line(rows: list[dict], stage: str = "stage2") -> str:
    return ", ".join(f"{r['preset']} {r['stage']} {r['images_per_s']:.1f} img/s"
                     + (f" (MFU {_pct(r['mfu_datasheet'])})" if r.get("mfu_datasheet") else "")
                     for r in rows if r["stage"] == stage) or f"{len(rows)} row(s)"


def _decode_line(r: dict) -> str:
    return ", ".join(f"{x['preset']} B={x['batch']}: {x['decode_images_per_s']:.1f} img/s, "
                     f"8 steps = {x['decode_over_one_pass']:.1f}x one pass"
                     for x in r.get("runs") or [])


def _max_batch_line(r: dict) -> str:
    probes = r.get("probes") or []
    ok = [p for p in probes if p["ok"] and p["batch"] == r.get("largest_ok")]
    peak = ok[0].get("peak_mem_gib") if ok else None
    return (f"largest fitting {r.get('largest_ok')}, smallest failing "
            f"{r.get('smallest_failed')} ({r.get('stopped')})"
            + (f", peak {peak:.1f} GiB at the largest" if peak else ""))


def _trials_line(trials: list[dict]) -> str:
    status = ", ".join(f"{t['trial']} {t['status']} on {t['placement'].get(DEVICE_TAG, '?')}"
                       for t in trials)
    models = {t["placement"].get(GPU_MODEL_TAG) for t in trials} - {None}
    return status + (f" ({', '.join(sorted(models))})" if models else "")


def _campaign_line(r: dict) -> str:
    run = r.get("run") or {}
    return (f"exit {run.get('returncode')} in {_f(run.get('seconds'), '.0f')} s; "
            + _trials_line(r.get("trials") or []))


def _ray_train_line(r: dict) -> str:
    return "; ".join(f"W={x['workers']}: exit {x['returncode']}, " + _trials_line(x["trials"])
                     for x in r.get("runs") or [])


LINES = {"env": _env_line, "golden": _golden_line, "gpu_path": _gpu_path_line,
         "throughput": lambda r: _rows_line(r.get("rows") or []),
         "compile": lambda r: _rows_line(r.get("rows") or []),
         "decode": _decode_line, "max_batch": _max_batch_line, "campaign": _campaign_line,
         "ray_train": _ray_train_line}


def answer(step: dict) -> str:
    """The step's one-line answer for the summary table."""
    if step["status"] in ("skipped", "pending", "running") and not step.get("result"):
        return step.get("reason") or ""
    r = step.get("result") or {}
    try:
        line = LINES[step["name"]](r)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        line = f"(unreadable result: {type(e).__name__})"
    reason = step.get("reason")
    return f"{line} — {reason}" if reason and line else (line or reason or "")


# --------------------------------------------------------------------------------------------
# the document
# --------------------------------------------------------------------------------------------


def render(report: dict) -> str:
    t = report["throughput"]
    where = t.get("device_name") or report["device"]
    state = ("finished" if report.get("finished") else
             f"NOT finished ({report.get('interrupted') or 'running or killed'})")
    git = report.get("git") or {}
    lines = [f"# Device check: {where} ({report['mode']})", "",
             (f"- {state}; wall {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s step "
              f"budget; started {report['started']}, updated {report['updated']}"),
             f"- command: `{report['command']}`",
             (f"- commit {git.get('commit') or '?'}{' (dirty)' if git.get('dirty') else ''}; "
              f"python {report.get('python')}")]
    if report.get("note"):
        lines.append(f"- {report['note']}")
    lines += ["", *_table(["#", "step", "status", "s", "box s", "answer"], [
        [i + 1, s["name"], s["status"], _f(s["seconds"], ".1f"), f"{s['box_s']:.0f}",
         answer(s).replace("|", "/")] for i, s in enumerate(report["steps"])])]
    lines += _throughput_section(t["rows"])
    lines += _golden_section(_result(report, "golden"))
    lines += _gpu_path_section(_result(report, "gpu_path"))
    lines += _max_batch_section(_result(report, "max_batch"))
    lines += _placement_section(report)
    return "\n".join(lines) + "\n"


def _throughput_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    eager = {(r["preset"], r["stage"]): r["images_per_s"] for r in rows if not r.get("compiled")}
    out = ["", "## Training throughput (random weights; stage 3 with its GAN on)", ""]
    out += _table(["preset", "stage", "mode", "precision", "batch×accum", "images/s", "s/step",
                   "first step s", "peak GiB", "TFLOP/step", "MFU datasheet", "MFU measured",
                   "vs eager", "stage 3"], [
        [r["preset"], r["stage"], r.get("mode", "eager"), r.get("precision"),
         f"{r['batch']}×{r['grad_accum']}", f"{r['images_per_s']:.1f}",
         f"{r['s_per_step']:.3f}", _f(r.get("first_step_s"), ".1f"),
         _f(r.get("peak_mem_gib"), ".1f"), _f((r.get("model_flops") or 0) / 1e12 or None),
         _pct(r.get("mfu_datasheet")), _pct(r.get("mfu_measured")),
         (f"{r['images_per_s'] / eager[(r['preset'], r['stage'])]:.2f}x"
          if r.get("compiled") and (r["preset"], r["stage"]) in eager else "—"),
         (f"{r.get('discriminator')}, LPIPS {'on' if r.get('lpips') else 'off'}"
          if r["stage"] == "stage3" else "")] for r in rows])
    out += ["", ("Model FLOPs: matmuls, convolutions and attention of one whole optimiser step "
                 "(forward, backward, the SFVR pass, the discriminator), counted by torch's "
                 "FlopCounterMode; MFU = FLOPs / s per step / peak (datasheet dense bf16, or "
                 "the matmul rate measured in `env`).")]
    return out


def _golden_section(r: dict) -> list[str]:
    if not r:
        return []
    names = []
    for p in ("fp32", "bf16"):
        for t in (r.get(p) or {}).get("tensors", []):
            if t["name"] not in names:
                names.append(t["name"])
    if not names:
        return ["", "## Golden equivalence", "", _golden_line(r)]

    def cell(p: str, name: str) -> str:
        t = next((t for t in (r.get(p) or {}).get("tensors", []) if t["name"] == name), None)
        if t is None:
            return "—"
        tol = "recorded" if t["tolerance"] is None else f"≤ {t['tolerance']:.2g}"
        return f"{t['error']:.3g} ({tol}{'' if t['ok'] in (True, None) else ' FAIL'})"

    out = ["", "## Golden equivalence (tests/test_golden.py on the device)", "",
           _golden_line(r), ""]
    out += _table(["tensor", "fp32", "bf16"], [[n, cell("fp32", n), cell("bf16", n)]
                                               for n in names])
    out += ["", "Floats: max abs error / max(1, max|expected|); ids: fraction differing."]
    return out


def _gpu_path_section(r: dict) -> list[str]:
    if not r:
        return []
    out = ["", "## GPU path", "", _gpu_path_line(r), ""]
    out += _table(["preset", "stage", "precision", "micro-batches", "CUDA syncs (where)",
                   "library reads"], [
        [s["preset"], s["stage"], s["precision"], s["micro_batches"],
         "n/a (CPU)" if s["cuda_syncs"] is None else
         (", ".join(f"{k} ×{v}" for k, v in s["cuda_syncs"].items()) or "none"),
         ", ".join(s["library_reads"]) or "none"] for s in r.get("steps") or []])
    for a in r.get("sdpa") or []:
        out += ["", f"SDPA for {a['preset']} (head dim {a['head_dim']}, length {a['length']}, "
                f"{a['dtype']}): dispatched to {', '.join(a['dispatched']) or '?'}; forced "
                "alone: " + "; ".join(f"{k} {v}" for k, v in a["forced"].items())]
    return out


def _max_batch_section(r: dict) -> list[str]:
    if not r.get("probes"):
        return []
    out = ["", "## Largest micro-batch (stage 2)", "", _max_batch_line(r), ""]
    out += _table(["batch", "fits", "s", "peak GiB", "error"], [
        [p["batch"], "yes" if p["ok"] else "no", f"{p['s']:.2f}", _f(p["peak_mem_gib"], ".1f"),
         p.get("error") or ""] for p in r["probes"]])
    return out


def _placement_section(report: dict) -> list[str]:
    trials = list(_result(report, "campaign").get("trials") or [])
    for run in _result(report, "ray_train").get("runs") or []:
        trials += [{**t, "trial": f"W={run['workers']} {t['trial']}"} for t in run["trials"]]
    if not trials:
        return []
    metrics = list(dict.fromkeys(k for t in trials for k in t["metrics"]))  # as the step chose
    out = ["", "## Placement tags read back from MLflow", ""]
    out += _table(["trial", "status", *PLACEMENT_SHOWN, *metrics], [
        [t["trial"], t["status"], *[t["placement"].get(k, "") for k in PLACEMENT_SHOWN],
         *[_f(t["metrics"].get(k), ".2f") for k in metrics]] for t in trials])
    return out
