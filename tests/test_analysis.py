"""Analysis notebooks (analysis/*.py) and their helpers.

The default tests build a small *synthetic* MLflow store with the client, following the layout
of `sftok/run_record.py` exactly (experiment per spec, parent run, child run per trial with
`arm`/`seed` tags and flattened-config params, `train/…`, `eval/…`, `trace/…` metrics,
`config.json`/`eval.json`/`trace.csv` artifacts) but spelling its names out, as a store written
by an earlier version of the runner has them, execute every notebook on it
through `analysis/render.py`, and check the tables, figures and the missing-runs message.
The `slow` test does the same on a store made by real `--preset smoke` runs of the specs.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow_data as md
import numpy as np
import pandas as pd
import pytest
import stats

ROOT = Path(__file__).resolve().parent.parent
ANALYSIS = ROOT / "analysis"

NOTEBOOKS = ["table3_sfvr_warmup", "table4_replace_ratio", "figure4_per_step",
             "figure8_step_sweep", "table1_reconstruction", "figures9_14_stage3_losses",
             "table5_compute", "table2_generation"]
NO_CAMPAIGN = {"table5_compute"}  # reads scripts/benchmark.py's throughput, not MLflow
SEEDS = (0, 1, 2)
# measured rFID/IS (gFID for the generation specs); the others use proxies
WITH_FID = ("ablation_replace_ratio", "step_sweep", "generation", "generation_guidance_sweep")
GENERATION_SPECS = ("generation", "generation_guidance_sweep")
STEPS = (1, 2, 4, 8, 16)
TRACE_COLS = ["kl_gt_all", "kl_gt_masked", "kl_final_all", "kl_final_masked", "top1_gt_all",
              "top1_gt_masked", "top1_final_all", "top1_final_masked", "num_fixed"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# A synthetic store with the runner's layout
# --------------------------------------------------------------------------------------------


def _arms(spec: str) -> dict[str, dict]:
    """arm -> params (+ `q`: quality offset, lower = better) of each spec; arm labels and
    stages as experiments/specs/*.yaml make them."""
    base = {"tokenizer.num_latent_tokens": 8, "tokenizer.quantizer.codebook_size": 64,
            "train.stage1.replacement": "none", "train.stage2.replace_ratio": 1.0,
            "train.stage2.replacement": "sfvr", "train.stage1.steps": 20,
            "train.stage2.steps": 40, "stages": "stage1,stage2"}
    if spec == "ablation_sfvr_warmup":
        cold = {"train.stage2.steps": 60, "stages": "stage2"}
        return {
            "vanilla_no_warmup": dict(base, **cold, **{"train.stage2.replacement": "vanilla"},
                                      q=0.6),
            "sfvr_no_warmup": dict(base, **cold, q=0.3),
            "sfvr_warmup": dict(base, q=0.2),
        }
    if spec == "ablation_replace_ratio":
        return {f"replace_ratio={r!r}": dict(base, **{"train.stage2.replace_ratio": r}, q=q)
                for r, q in [(0.5, 0.5), (0.8, 0.35), (1.0, 0.2)]}
    if spec == "per_step_trace":
        return {"replacement=vanilla": dict(base, **{"train.stage2.replacement": "vanilla"}, q=0.4),
                "replacement=sfvr": dict(base, q=0.2)}
    if spec == "step_sweep":  # the three-stage model (Figure 8) and stage 2 (Figure 7), tau 0/1
        return {f"{m},temperature={t!r}": dict(base, **{"decode.temperature": t, "stages": st},
                                               q=q + 0.02 * t)
                for m, st, q in [("stage3", "stage1,stage2,stage3", 0.15),
                                 ("stage2", "stage1,stage2", 0.2)] for t in (0.0, 1.0)}
    if spec == "reconstruction":  # through stage 3 (Figures 9-14 read its losses)
        return {"base": dict(base, **{"stages": "stage1,stage2,stage3", "train.stage3.steps": 30,
                                      "train.stage3.gan_weight": 0.5,
                                      "train.stage3.lpips_weight": 0.0}, q=0.2)}
    return {"base": dict(base, q=0.2)}


def _log_trial(client, exp_id, parent_id, spec, arm, seed, p, with_fid, rng, drop=None):
    from mlflow.entities import Metric, Param

    unavailable = {} if with_fid else {
        "rfid": "Inception weights not found; put pt_inception-2015-12-05.pth in "
                "~/.cache/torch/hub/checkpoints",
        "is": "Inception weights not found"}
    run = client.create_run(exp_id, run_name=f"{arm}_s{seed}", tags={
        "mlflow.parentRunId": parent_id, "sftok.role": "trial", "arm": arm, "seed": str(seed),
        "trial_key": f"{arm}_s{seed}", "spec": spec, "stages": p["stages"],
        **{f"eval_unavailable.{k}": v for k, v in unavailable.items()}})
    rid = run.info.run_id
    q = p.pop("q") + 0.02 * rng.standard_normal()
    params = [Param(k, str(v)) for k, v in dict(p, seed=seed, preset="synthetic").items()]
    t0 = int(time.time() * 1000)
    metrics = []
    s1 = p["train.stage1.steps"] if "stage1" in p["stages"] else 0
    s2 = p["train.stage2.steps"]
    for step in range(0, s1 + s2 + 1, 5):
        stage = "stage1" if step < s1 else "stage2"
        loss = 6.0 * math.exp(-step / 30) + 2 * q + 0.05 * rng.standard_normal()
        metrics += [Metric(f"train/{stage}/loss", loss + 0.01, t0, step),
                    Metric(f"train/{stage}/ce", loss, t0, step)]
    if "train.stage3.steps" in p:  # stage-3 losses (no LPIPS: lpips_weight 0), GAN from 10
        off = s1 + s2
        for step in range(0, p["train.stage3.steps"] + 1, 5):
            l2 = 0.05 * math.exp(-step / 20) + 0.01 * q
            vals = {"l2": l2, "quant_loss": 0.3 + 0.01 * q, "loss": l2 + 0.3}
            if step >= 10:
                vals.update(gan_d=0.9 - 0.002 * step, gan_g=0.1 + 0.001 * step, lecam=0.01)
            metrics += [Metric(f"train/stage3/{k}", v + 0.001 * rng.standard_normal(), t0,
                               off + step) for k, v in vals.items()]
    for s in STEPS:
        gain = 1.0 / math.sqrt(s)
        metrics += [Metric(f"eval/psnr_s{s}", 24 - 10 * q - 2 * gain + 0.1 * rng.standard_normal(), t0, 0),
                    Metric(f"eval/ssim_s{s}", 0.8 - 0.2 * q - 0.05 * gain, t0, 0),
                    Metric(f"eval/lpips_s{s}", 0.1 + 0.3 * q + 0.05 * gain + 0.005 * rng.standard_normal(), t0, 0)]
        if with_fid:
            metrics += [Metric(f"eval/rfid_s{s}", 4 + 5 * q + 3 * gain + 0.1 * rng.standard_normal(), t0, 0),
                        Metric(f"eval/is_s{s}", 180 - 20 * q - 8 * gain, t0, 0)]
    if spec != "ablation_sfvr_warmup":  # Table 3's store predates floors and ceilings
        bounds = {"floor_tokenizer": {"psnr": 17.0, "ssim": 0.6, "lpips": 0.4, "rfid": 12.0,
                                      "is": 100.0},
                  "floor_teacher": {"psnr": 20.0, "ssim": 0.7, "lpips": 0.3, "rfid": 9.0,
                                    "is": 130.0},
                  "teacher": {"psnr": 23.0, "ssim": 0.85, "lpips": 0.1, "rfid": 3.0,
                              "is": 200.0}}
        metrics += [Metric(f"eval/{prefix}_{m}", v, t0, 0) for prefix, vals in bounds.items()
                    for m, v in vals.items() if with_fid or m not in ("rfid", "is")]
    metrics += [Metric("eval/token_ce", 3 + q, t0, 0), Metric("eval/token_top1", 0.3 - 0.1 * q, t0, 0),
                Metric("eval/codebook_usage", 0.9, t0, 0)]
    if spec == "per_step_trace":  # revealed-token information: true ids help, own ids do not
        for pct in (25, 50, 75):
            none = 4.0 + q
            vals = {"ce_none": none, "ce_gt": none - 0.2 * pct / 100 - 0.01 * rng.random(),
                    "ce_self": none + 0.002 * rng.standard_normal()}
            vals.update(info_gt=none - vals["ce_gt"], info_self=none - vals["ce_self"])
            metrics += [Metric(f"eval/reveal_{k}_r{pct}", v, t0, 0) for k, v in vals.items()]
    rows = []
    S = 8
    for i in range(1, S + 1):
        r = {"step": i,
             "kl_gt_all": 3.0 / i + 1.0 + q, "kl_gt_masked": 3.5 / i + 1.2 + q,
             "kl_final_all": 2.0 * (S - i) / S, "kl_final_masked": 2.5 * (S - i) / S,
             "top1_gt_all": 0.2 + 0.2 * i / S, "top1_gt_masked": 0.15 + 0.2 * i / S,
             "top1_final_all": 0.4 + 0.6 * i / S, "top1_final_masked": 0.3 + 0.7 * i / S,
             "num_fixed": 16 * i // S}
        rows.append(r)
        metrics += [Metric(f"trace/{k}", float(v), t0, i) for k, v in r.items() if k != "step"]
    if drop is not None:  # metrics this trial did not log (thin-data tests)
        metrics = [m for m in metrics if not drop(spec, arm, seed, m.key)]
        rows = [{k: v for k, v in r.items() if not drop(spec, arm, seed, f"trace/{k}")}
                for r in rows]
    for i in range(0, len(metrics), 900):
        client.log_batch(rid, metrics=metrics[i:i + 900],
                         params=params if i == 0 else [], tags=[])
    client.log_text(rid, json.dumps(p), "config.json")
    client.log_text(rid, json.dumps({"metrics": {}, "unavailable": unavailable}), "eval.json")
    client.log_text(rid, pd.DataFrame(rows).to_csv(index=False), "trace.csv")
    client.set_terminated(rid, "FINISHED")


SWEEP_GRID = [(sch, sc, tau) for sch in ("constant", "linear", "power-cosine")
              for sc in (0.0, 2.0, 4.5) for tau in (0.0, 1.0)]


def _log_generation_trial(client, exp_id, parent_id, spec, seed, with_fid, rng):
    """A `generation` stage trial as the runner logs it (experiments/.../generation.py)."""
    from mlflow.entities import Metric, Param
    from PIL import Image

    unavailable = {} if with_fid else {m: "Inception weights not found" for m in
                                       ("gfid", "is", "calibration")}
    run = client.create_run(exp_id, run_name=f"base_s{seed}", tags={
        "mlflow.parentRunId": parent_id, "sftok.role": "trial", "arm": "base", "seed": str(seed),
        "trial_key": f"base_s{seed}", "spec": spec, "stages": "stage1,stage2,generation",
        **{f"eval_unavailable.{k}": v for k, v in unavailable.items()}})
    rid, t0 = run.info.run_id, int(time.time() * 1000)
    params = {"tokenizer.num_latent_tokens": 8, "tokenizer.quantizer.codebook_size": 64,
              "generation.eval.samples_per_class": 10, "generation.sampling.guidance_scale": 4.5,
              "generation.sampling.guidance_schedule": "constant",
              "generation.sampling.temperature": 1.0, "seed": seed, "preset": "synthetic"}
    def noise() -> float:
        return 0.3 * rng.standard_normal()

    vals = {"sample_codebook_usage": 0.5 + 0.01 * noise(), "data_codebook_usage": 0.6,
            "num_samples": 70.0, "num_classes": 7.0}
    if with_fid:
        vals.update(gfid=40 + noise(), calib_fid_heldout=5 + noise(),
                    calib_fid_recon=20 + noise(), **{"is": 3 + noise()})
        if spec == "generation_guidance_sweep":
            for sch, sc, tau in SWEEP_GRID:
                vals[f"sweep/{sch}/s{sc:g}/tau{tau:g}/gfid"] = 50 - 3 * sc + 5 * tau + noise()
                vals[f"sweep/{sch}/s{sc:g}/tau{tau:g}/sample_codebook_usage"] = 0.5 - 0.05 * sc
    metrics = [Metric(f"eval/{k}", float(v), t0, 0) for k, v in vals.items()]
    metrics += [Metric("train/generation/loss", 5.0 - 0.01 * i, t0, 600 + i) for i in range(5)]
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[])
    client.log_text(rid, json.dumps({"metrics": vals, "unavailable": unavailable}), "eval.json")
    client.log_text(rid, json.dumps({"grid_classes": [0, 4, 9], "class_names": {
        "0": "astronaut", "4": "motorcycle_left", "9": "colorwheel"},
        "sampling": {"guidance_scale": 4.5, "guidance_schedule": "constant",
                     "temperature": 1.0, "steps": 8}}), "generation.json")
    grid = (rng.random((3 * 34 + 2, 4 * 34 + 2, 3)) * 255).astype(np.uint8)
    png = Path(tempfile.mkdtemp()) / "samples.png"
    Image.fromarray(grid).save(png)
    client.log_artifact(rid, str(png), "grids")
    client.set_terminated(rid, "FINISHED")


def build_store(root: Path, specs=tuple(md.SPECS), with_fid=(), seeds=SEEDS, drop=None) -> str:
    """A SQLite MLflow store under `root` with one parent run per spec; returns its URI.
    `with_fid`: the specs whose trials measured rFID and IS (the others: unavailable, as
    offline). `drop(spec, arm, seed, key)`: true for the metrics (and trace.csv columns,
    `trace/<col>`) a trial does not log."""
    from mlflow.tracking import MlflowClient

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    rng = np.random.default_rng(0)
    for spec in specs:
        exp = client.get_experiment_by_name(spec)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            spec, artifact_location=(root / "artifacts" / spec).as_uri())
        parent = client.create_run(exp_id, run_name=f"{spec}-synthetic", tags={
            "spec": spec, "preset": "synthetic", "git_commit": "0" * 40,
            "command": f"python experiments/run.py {spec}", "sftok.role": "parent"})
        if spec in GENERATION_SPECS:
            for seed in seeds:
                _log_generation_trial(client, exp_id, parent.info.run_id, spec, seed,
                                      spec in with_fid, rng)
        for arm, p in _arms(spec).items() if spec not in GENERATION_SPECS else ():
            for seed in seeds:
                _log_trial(client, exp_id, parent.info.run_id, spec, arm, seed, dict(p),
                           spec in with_fid, rng, drop)
        client.set_terminated(parent.info.run_id, "FINISHED")
    return uri


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("store"), with_fid=WITH_FID)


def render(names, uri, out, *extra, timeout=600):
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(ANALYSIS / "render.py"), *names,
                           "--tracking-uri", uri, "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
                          check=False)


# --------------------------------------------------------------------------------------------
# Output checks
# --------------------------------------------------------------------------------------------

# notebook -> {table: (columns the CSV must have, expected number of rows or None)}
TRACE_QUANTITIES = [f"{k}_{r}_{p}" for k in ("kl", "top1") for r in ("gt", "final")
                    for p in ("all", "masked")]
EXPECTED_TABLES = {
    "table3_sfvr_warmup": {
        "table3": (["arm", "strategy", "warmup", "n_seeds", "metric", "mean", "ci_low",
                    "ci_high", "paper_rfid"], 3),
        "table3_paired": (["a", "b", "metric", "n_common_seeds", "diff_mean", "ci_low",
                           "ci_high", "p_value", "paper_rfid_diff"], 2)},
    "table4_replace_ratio": {
        "table4": (["replace_ratio", "arm", "n_seeds", "metric", "mean", "ci_low", "ci_high",
                    "paper_rfid"], 3),
        "table4_paired": (["a", "b", "metric", "n_common_seeds", "diff_mean", "ci_low",
                           "ci_high", "p_value", "paper_rfid_diff"], 3),
        "table4_steps": (["replace_ratio", "metric", "minus", "n", "mean", "ci_low", "ci_high",
                          "excludes_zero"], 3)},
    "figure4_per_step": {
        "figure4a": (["arm", "quantity", "step", "n", "mean", "ci_low", "ci_high"], None),
        "figure4b": (["arm", "warmup", "stage", "step", "n", "mean", "ci_low", "ci_high"], None),
        "figure4b_final": (["arm", "warmup", "n", "mean", "ci_low", "ci_high"], 3)},
    "figure8_step_sweep": {
        "figure8": (["arm", "metric", "steps", "n", "mean", "ci_low", "ci_high", "paper"], None),
        "figure8_temperature": (["model", "metric", "steps", "n_common_seeds", "diff_mean",
                                 "ci_low", "ci_high", "p_value"], None)},
    "table1_reconstruction": {
        "table1": (["model", "source", "tokens", "codebook", "rfid_mean", "psnr_mean",
                    "ssim_mean", "lpips_mean"], None)},
    "figures9_14_stage3_losses": {
        "figures9_14": (["figure", "curve", "what", "logged", "first_step", "first_mean",
                         "last_step", "last_mean", "n_seeds", "note"], 6)},
    "table5_compute": {
        "table5": (["source", "model", "stages", "device", "images_per_s",
                    "gpu_hours_paper_budget", "hours_preset_budget", "paper_gpu_hours"], None)},
    "table2_generation": {
        "table2": (["model", "source", "tokens", "codebook", "gfid_mean", "is_mean",
                    "calib_fid_heldout_mean", "calib_fid_recon_mean"], None),
        "guidance_sweep": (["schedule", "scale", "temperature", "n"], None)},
}
PIVOTED = {"figure4a", "figure8"}
EXPECTED_FIGURES = {
    "figure4_per_step": {"figure4a": ("decode step i", 4), "figure4b": ("optimiser step", 1)},
    "figure8_step_sweep": {"figure8": ("decode steps S", None)},
    "figures9_14_stage3_losses": {"figures9_14": ("stage-3 optimiser step", None)},
    "table2_generation": {"guidance_sweep": ("guidance scale", None)},
}


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 200 and im.size[1] > 150


def check_outputs(out: Path, name: str, n_arms: dict | None = None) -> dict:
    d = out / name
    assert (d / f"{name}.ipynb").exists()
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["notebook"] == name and (manifest["campaigns"] or name in NO_CAMPAIGN)
    reading = (d / "reading.md").read_text().strip()
    assert len(reading) > 80, reading
    for table, (cols, rows) in EXPECTED_TABLES[name].items():
        df = pd.read_csv(d / f"{table}.csv")
        assert set(cols) <= set(df.columns), (table, list(df.columns))
        if rows is not None:
            assert len(df) == rows, (table, len(df))
        mdtext = (d / f"{table}.md").read_text()
        header = mdtext.splitlines()[0]
        assert header.startswith("|") and mdtext.splitlines()[1].startswith("|")
        md_rows = sum(1 for ln in mdtext.splitlines() if ln.startswith("|")) - 2
        if table != "table1":  # the Markdown adds the floor/ceiling rows beside the arms
            md_rows -= sum(1 for ln in mdtext.splitlines()
                           if any(f"| {label}" in ln for label in md.BOUNDS.values()))
        if table in PIVOTED:  # Markdown: one row per arm × step, the quantities as columns
            step = "step" if "step" in df else "steps"
            assert md_rows == len(df.drop_duplicates(["arm", step])), (table, md_rows)
        else:
            assert md_rows == len(df), (table, md_rows)
    for fig, (xlabel, n_axes) in EXPECTED_FIGURES.get(name, {}).items():
        _check_png(d / f"{fig}.png")
        axes = json.loads((d / f"{fig}.axes.json").read_text())["axes"]
        assert axes and (n_axes is None or len(axes) == n_axes), axes
        for ax in axes:
            assert xlabel in ax["xlabel"] and ax["ylabel"] and ax["title"] and ax["lines"], ax
    return manifest


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_mean_ci_matches_scipy():
    from scipy import stats as st

    rng = np.random.default_rng(1)
    for n in (2, 3, 5, 12):
        x = rng.normal(3.0, 0.7, n)
        iv = stats.mean_ci(x)
        lo, hi = st.t.interval(0.95, n - 1, loc=x.mean(), scale=st.sem(x))
        assert iv.n == n and math.isclose(iv.mean, x.mean())
        assert math.isclose(iv.low, lo, rel_tol=1e-10) and math.isclose(iv.high, hi, rel_tol=1e-10)
    # NaNs are dropped; one value has no interval; none has no mean.
    iv = stats.mean_ci([1.0, float("nan"), 3.0])
    assert iv.n == 2 and iv.mean == 2.0
    one = stats.mean_ci([4.2])
    assert one.n == 1 and one.mean == 4.2 and math.isnan(one.half) and one.fmt(2) == "4.20"
    assert stats.mean_ci([]).n == 0 and stats.format_ci(float("nan"), 1.0) == "—"
    assert stats.mean_ci([1, 2]).overlaps(stats.mean_ci([1.5, 2.5]))
    assert not stats.Interval(0, 0.1, 3, 1).overlaps(stats.Interval(1, 0.1, 3, 1))


def test_paired_diff_matches_scipy():
    from scipy import stats as st

    rng = np.random.default_rng(2)
    seeds = list(range(6))
    a = rng.normal(5, 1, 6)
    b = a - 0.3 + rng.normal(0, 0.1, 6)
    df = pd.DataFrame({"arm": ["A"] * 6 + ["B"] * 5, "seed": seeds + seeds[:5],
                       "v": np.concatenate([a, b[:5]])})
    # Arm B lacks seed 5: the difference uses the 5 common seeds only.
    res = stats.paired_diff(df, "arm", "seed", "v", "A", "B")
    d = b[:5] - a[:5]
    assert res.seeds == (0, 1, 2, 3, 4) and res.diff.n == 5
    assert math.isclose(res.diff.mean, d.mean())
    lo, hi = st.t.interval(0.95, 4, loc=d.mean(), scale=st.sem(d))
    assert math.isclose(res.diff.low, lo) and math.isclose(res.diff.high, hi)
    assert math.isclose(res.p_value, st.ttest_rel(b[:5], a[:5]).pvalue)
    assert res.excludes_zero
    pt = stats.paired_table(df, "arm", "seed", "v", [("A", "B")])
    assert list(pt["n_common_seeds"]) == [5] and bool(pt["excludes_zero"][0])


def test_stats_thin_data():
    # One finished seed: no interval, so whether it overlaps another is undetermined (None).
    one, two = stats.mean_ci([4.2]), stats.mean_ci([1.0, 2.0])
    assert one.overlaps(two) is None and two.overlaps(one) is None
    assert one.overlaps(one) is None and two.overlaps(stats.mean_ci([1.5, 2.5])) is True
    # Zero-variance paired differences: the t-test is undefined, p is NaN and shown "n/a".
    df = pd.DataFrame({"arm": ["A", "A", "B", "B"], "seed": [0, 1, 0, 1],
                       "v": [1.0, 2.0, 1.5, 2.5]})
    res = stats.paired_diff(df, "arm", "seed", "v", "A", "B")
    assert res.diff.n == 2 and math.isclose(res.diff.mean, 0.5) and math.isnan(res.p_value)
    assert stats.format_p(res.p_value) == "n/a" and stats.format_p(0.0004) == "<0.001"
    same = stats.paired_diff(df.assign(v=[1.0, 2.0, 1.0, 2.0]), "arm", "seed", "v", "A", "B")
    assert same.diff.mean == 0 and math.isnan(same.p_value)
    assert stats.paired_table(df, "arm", "seed", "v", [("A", "B")])["p_value"].isna().all()
    # One common seed: no interval, no p.
    single = stats.paired_diff(df[df["seed"] == 0], "arm", "seed", "v", "A", "B")
    assert single.diff.n == 1 and math.isnan(single.p_value) and not single.excludes_zero


def test_load_campaign(store):
    camp = md.load_campaign("ablation_replace_ratio", store)
    assert len(camp.runs) == 9 and camp.seeds == [0, 1, 2]
    assert set(camp.runs["arm"]) == {"replace_ratio=0.5", "replace_ratio=0.8", "replace_ratio=1.0"}
    assert sorted(camp.column("train.stage2.replace_ratio").unique()) == [0.5, 0.8, 1.0]
    assert md.choose_steps(camp) == 8 and md.eval_steps(camp, "psnr") == list(STEPS)
    assert md.choose_metric(camp, 8) == ("rfid", "eval/rfid_s8")
    assert md.unavailable_note(camp, "rfid", "rfid") == ""
    # rFID absent (offline) -> LPIPS proxy, and the reason comes from the runs.
    cold = md.load_campaign("ablation_sfvr_warmup", store)
    assert md.choose_metric(cold, 8) == ("lpips", "eval/lpips_s8")
    assert "Inception" in md.unavailable_note(cold, "rfid", "lpips")
    h = camp.history("train/stage2/ce")
    assert list(h.columns) == ["run_id", "arm", "seed", "step", "value"]
    assert h["step"].min() == 20 and h.groupby("run_id").size().nunique() == 1
    tr = camp.traces()
    assert set(TRACE_COLS) <= set(tr.columns) and sorted(tr["step"].unique()) == list(range(1, 9))
    # The same trace from the trace/* metrics when trace.csv is absent.
    rid = camp.runs["run_id"].iloc[0]
    from_metrics = camp.trace.__func__(_NoArtifacts(camp), rid)
    pd.testing.assert_frame_equal(
        from_metrics[["step"] + TRACE_COLS].astype(float),
        camp.trace(rid)[["step"] + TRACE_COLS].astype(float), check_like=True)
    # Explicit parent id; a parent of another spec is refused with the spec-to-run message.
    assert md.load_campaign("ablation_replace_ratio", store, camp.parent_id).parent_id == \
        camp.parent_id
    other = md.load_campaign("step_sweep", store).parent_id
    with pytest.raises(md.RunsNotFound, match="run `python experiments/run.py ablation_replace"):
        md.load_campaign("ablation_replace_ratio", store, other)
    stages = md.load_campaign("ablation_sfvr_warmup", store).trained_stages()
    assert sorted(set(stages)) == [("stage1", "stage2"), ("stage2",)]


class _NoArtifacts:
    """A Campaign stand-in whose artifacts are missing (trace falls back to trace/* metrics)."""

    def __init__(self, camp):
        self.client = camp.client

    def artifact_text(self, run_id, path):
        return None


def test_latest_parent_and_missing_runs(tmp_path):
    root = tmp_path / "store"
    uri = build_store(root, specs=("step_sweep",), seeds=(0,))
    first = md.load_campaign("step_sweep", uri).parent_id
    time.sleep(0.01)
    build_store(root, specs=("step_sweep",), seeds=(0, 1))
    latest = md.load_campaign("step_sweep", uri)
    assert latest.parent_id != first and latest.seeds == [0, 1]
    assert md.load_campaign("step_sweep", uri, first).seeds == [0]
    # A plain directory is read as DIR/mlflow.db, like experiments/run.py --tracking-uri DIR.
    assert md.load_campaign("step_sweep", str(root)).parent_id == latest.parent_id

    with pytest.raises(md.RunsNotFound) as e:
        md.load_campaign("ablation_replace_ratio", uri)
    assert str(e.value).startswith("no runs for spec ablation_replace_ratio in store " + uri)
    assert "run `python experiments/run.py ablation_replace_ratio` first" in str(e.value)

    # Through render.py: a clear message naming the spec(s) to run, exit 2, no traceback;
    # the outputs of an earlier run of the notebook are removed, not left beside the new one.
    stale = tmp_path / "out" / "figure4_per_step"
    stale.mkdir(parents=True)
    for f in ("reading.md", "figure4a.csv", "manifest.json"):
        (stale / f).write_text("from an earlier run")
    r = render(["figure4_per_step"], uri, tmp_path / "out", "--no-log")
    assert r.returncode == 2, r.stderr
    assert [f.name for f in stale.iterdir()] == ["figure4_per_step.ipynb"]  # the new one only
    for spec in ("per_step_trace", "ablation_sfvr_warmup"):
        assert f"python experiments/run.py {spec}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout

    r = render(["table1_reconstruction"], str(tmp_path / "nowhere"), tmp_path / "out2",
               "--no-log")
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "nowhere").exists()  # reading must not create an empty store


def test_render_log_failure_and_stale_outputs(store, tmp_path, monkeypatch, capsys):
    """In-process, with execution stubbed: old outputs are removed before a notebook runs, and
    a failure to log one notebook's outputs is reported and does not stop the others."""
    import render as rd

    monkeypatch.setenv("MPLBACKEND", "Agg")
    seen = []

    def fake_execute(name, params, out, timeout):
        seen.append((name, out.exists()))
        out.mkdir(parents=True)
        (out / f"{name}.ipynb").write_text("{}")
        return "ok", ""

    def fake_log(name, out):
        if name == "table3_sfvr_warmup":
            raise RuntimeError("artifact store is read-only")
        return ["spec:run"]

    stale = tmp_path / "out" / "table3_sfvr_warmup"
    stale.mkdir(parents=True)
    (stale / "reading.md").write_text("old reading")
    (stale / "table3.csv").write_text("old table")
    monkeypatch.setattr(rd, "execute", fake_execute)
    monkeypatch.setattr(rd, "log_outputs", fake_log)
    rc = rd.main(["table3_sfvr_warmup", "table4_replace_ratio", "--tracking-uri", store,
                  "--out", str(tmp_path / "out")])
    cap = capsys.readouterr()
    assert rc == 1, cap
    assert seen == [("table3_sfvr_warmup", False), ("table4_replace_ratio", False)]
    assert [p.name for p in stale.iterdir()] == ["table3_sfvr_warmup.ipynb"]
    assert "[render] table3_sfvr_warmup:" in cap.err and "FAILED" in cap.err
    assert "RuntimeError: artifact store is read-only" in cap.err
    assert "[render] table4_replace_ratio: ok" in cap.out


def test_readings_undetermined_on_thin_data(tmp_path):
    """Readings on a store missing the data they need say "undetermined", not a verdict."""
    def drop(spec, arm, seed, key):
        return ((spec == "step_sweep" and key in ("eval/rfid_s1", "eval/rfid_s8"))
                or (spec == "ablation_sfvr_warmup" and arm == "sfvr_warmup"
                    and key == "eval/lpips_s8")
                or (spec == "ablation_replace_ratio" and arm == "replace_ratio=0.5" and seed > 0
                    and key == "eval/rfid_s8")
                or (spec == "per_step_trace" and (key == "trace/top1_gt_all"
                                                  or key.startswith("eval/reveal_"))))

    names = ["table3_sfvr_warmup", "table4_replace_ratio", "figure4_per_step",
             "figure8_step_sweep"]
    uri = build_store(tmp_path / "store", specs=("ablation_sfvr_warmup", "ablation_replace_ratio",
                                                 "per_step_trace", "step_sweep"),
                      with_fid=WITH_FID, drop=drop)
    r = render(names, uri, tmp_path / "out", "--no-log")
    assert r.returncode == 0, r.stdout + r.stderr
    reading = {n: (tmp_path / "out" / n / "reading.md").read_text() for n in names}
    # Table 3: the warm-up arm has no value, so its paired difference is NaN.
    r3 = reading["table3_sfvr_warmup"]
    assert "sfvr_warmup vs sfvr_no_warmup" in r3 and "ours is undetermined" in r3, r3
    assert "ours finds it worse (Δ nan" not in r3 and "nan" not in r3, r3
    # Table 4: ratio 0.5 has one finished seed: no interval, so no "overlap".
    r4 = reading["table4_replace_ratio"]
    assert "undetermined (n < 2) for 0.5/0.8, 0.5/1.0" in r4, r4
    assert "overlap for 0.5" not in r4 and "[nan, nan]" not in r4, r4
    # Figure 4: no top1_gt_all traced, so the paper's claim can be neither confirmed nor not.
    r4f = reading["figure4_per_step"]
    assert "is undetermined" in r4f and "not borne out" not in r4f and "nan" not in r4f, r4f
    assert "revealed-token information was not logged" in r4f, r4f
    # Figure 8: rFID not evaluated at S = 1 and 8 -> undetermined; IS improves beyond noise.
    r8 = reading["figure8_step_sweep"]
    assert "rFID from 1 to 8 steps is undetermined (no stage-3 arm evaluated both" in r8, r8
    assert "IS from 1 to 8 steps improves (paired CI excludes 0) as in the paper" in r8, r8
    assert "nan" not in r8, r8


def test_render_all_notebooks(store, tmp_path):
    t0 = time.time()
    r = render([], store, tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    for name in NOTEBOOKS:
        manifest = check_outputs(tmp_path / "out", name)
        # Logged as artifacts of each parent run the notebook read.
        for info in manifest["campaigns"].values():
            logged = {Path(a.path).name for a in
                      client.list_artifacts(info["parent_run_id"], f"analysis/{name}")}
            assert f"{name}.ipynb" in logged and "manifest.json" in logged, logged
    t4 = pd.read_csv(tmp_path / "out/table4_replace_ratio/table4.csv")
    assert list(t4["replace_ratio"]) == [0.5, 0.8, 1.0]
    assert list(t4["paper_rfid"]) == [4.96, 4.59, 4.33] and set(t4["n_seeds"]) == {3}
    assert (t4["ci_low"] < t4["mean"]).all() and (t4["mean"] < t4["ci_high"]).all()
    # Table 4's store measured rFID: used as is, no proxy. Table 3's did not: LPIPS, said so.
    assert set(t4["metric"]) == {"eval/rfid_s8"}
    assert "proxy" not in (tmp_path / "out/table4_replace_ratio/table4.md").read_text()
    reading = (tmp_path / "out/table4_replace_ratio/reading.md").read_text()
    assert "ordering is reproduced" in reading  # the synthetic store is built so that it is
    # 8 steps minus 1 of the same trial: rFID 3 (1/sqrt(8) - 1) lower, beyond the noise
    steps4 = pd.read_csv(tmp_path / "out/table4_replace_ratio/table4_steps.csv")
    assert set(steps4["minus"]) == {"eval/rfid_s1"} and steps4["excludes_zero"].all()
    assert ((steps4["mean"] + 1.94).abs() < 0.3).all(), steps4
    assert "8 decode steps minus 1, per trial: ratio 0.5 -" in reading, reading
    # Floor and ceiling beside the arms, and where the arms stand between them (rFID: the
    # synthetic arms lie between the floor 12 and the ceiling 3, none below the floor).
    md4 = (tmp_path / "out/table4_replace_ratio/table4.md").read_text()
    assert all(label in md4 for label in md.BOUNDS.values())
    assert "12.000" in md4 and "3.000" in md4
    assert "from floor (0%) to ceiling (100%)" in reading and "below the floor" not in reading
    assert "(the floor)" in (tmp_path / "out/figure8_step_sweep/reading.md").read_text()
    assert "ceiling: the teacher" in (tmp_path / "out/table1_reconstruction/table1.md").read_text()
    # a store without them says so instead of placing the arms
    assert "No floor/ceiling" in (tmp_path / "out/table3_sfvr_warmup/reading.md").read_text()
    md3 = (tmp_path / "out/table3_sfvr_warmup/table3.md").read_text()
    assert "LPIPS is reported as a proxy" in md3 and "Inception" in md3
    t3 = pd.read_csv(tmp_path / "out/table3_sfvr_warmup/table3.csv")
    assert sorted(zip(t3["strategy"], t3["warmup"])) == [("sfvr", False), ("sfvr", True),
                                                         ("vanilla", False)]
    f4a = pd.read_csv(tmp_path / "out/figure4_per_step/figure4a.csv")
    assert len(f4a) == 2 * 8 * len(TRACE_QUANTITIES) and set(f4a["quantity"]) == set(
        TRACE_QUANTITIES)
    rev = pd.read_csv(tmp_path / "out/figure4_per_step/figure4a_revealed.csv")
    assert len(rev) == 2 * 5 * 3 and set(rev["r"]) == {0.25, 0.5, 0.75}
    gt50 = rev[(rev["kind"] == "info_gt") & (rev["r"] == 0.5)]
    assert (gt50["mean"] > 0.1).all() and (gt50["ci_low"] > 0).all()
    _check_png(tmp_path / "out/figure4_per_step/figure4a_revealed.png")
    r4f = (tmp_path / "out/figure4_per_step/reading.md").read_text()
    assert "Revealing 50% of the ground-truth ids lowers" in r4f, r4f
    assert "true tokens would help, but the ids that decoding at τ = 0 reveals" in r4f, r4f
    f8 = pd.read_csv(tmp_path / "out/figure8_step_sweep/figure8.csv")
    assert set(f8["metric"]) == {"rfid", "is", "psnr", "ssim", "lpips"}
    assert sorted(set(f8["steps"])) == list(STEPS)
    axes = json.loads((tmp_path / "out/figure8_step_sweep/figure8.axes.json").read_text())["axes"]
    is_axes = next(a for a in axes if a["title"] == "IS")
    assert len(axes) == 5 and "paper (SFTok-B)" in is_axes["lines"]
    # Figure 8 is the three-stage model; tau = 1 minus tau = 0, paired, per model / metric / S
    ft = pd.read_csv(tmp_path / "out/figure8_step_sweep/figure8_temperature.csv")
    assert set(ft["model"]) == {"stage 2", "stage 3"} and set(ft["n_common_seeds"]) == {3}
    assert len(ft) == 2 * 5 * len(STEPS)
    assert "Temperature (tau 1 − 0) at S = 8" in (
        tmp_path / "out/figure8_step_sweep/reading.md").read_text()
    # Figures 9-14: the stage-3 curves, LPIPS missing with its reason, on the stage-3 step axis
    f9 = pd.read_csv(tmp_path / "out/figures9_14_stage3_losses/figures9_14.csv")
    assert list(f9["curve"]) == ["gan_d", "gan_g", "lpips", "quant_loss", "l2", "loss"]
    assert list(f9["logged"]) == [True, True, False, True, True, True]
    assert "lpips_weight = 0" in f9.loc[2, "note"]
    assert f9.loc[0, "first_step"] == 10 and f9.loc[4, "first_step"] == 0
    assert (f9.loc[f9["logged"], "last_step"] == 30).all() and f9["n_seeds"].max() == 3
    r9 = (tmp_path / "out/figures9_14_stage3_losses/reading.md").read_text()
    assert "Figure 13 (l2) falls" in r9 and "Not logged: lpips" in r9, r9
    # Table 5: throughput measured here (smoke), projected to the paper's budget, paper beside
    t5 = pd.read_csv(tmp_path / "out/table5_compute/table5.csv")
    ours = t5[t5["source"].str.startswith("ours")]
    assert list(ours["stages"]) == ["stage1+2", "stage3"] and (ours["model"] == "smoke").all()
    assert (ours["gpu_hours_paper_budget"] > 0).all() and (ours["hours_preset_budget"] > 0).all()
    paper_rows = t5[t5["source"].str.startswith("paper")]
    assert sorted(paper_rows["paper_gpu_hours"]) == [1224, 1656, 1728, 3264]
    t1md = (tmp_path / "out/table1_reconstruction/table1.md").read_text()
    assert "rFID — Inception weights not found" in t1md
    t1 = pd.read_csv(tmp_path / "out/table1_reconstruction/table1.csv")
    assert (t1["source"] == "paper").sum() == len(md.paper_results()["table1_reconstruction"])
    t2 = pd.read_csv(tmp_path / "out/table2_generation/table2.csv")
    assert (t2["source"] == "paper").sum() == len(md.paper_results()["table2_generation"])
    ours = t2[t2["source"] != "paper"]
    assert len(ours) == 1 and 38 < ours["gfid_mean"].iloc[0] < 42
    sweep = pd.read_csv(tmp_path / "out/table2_generation/guidance_sweep.csv")
    assert len(sweep) == len(SWEEP_GRID) and set(sweep["n"]) == {len(SEEDS)}
    assert "gfid_mean" in sweep  # measured gFID, not the code-usage proxy
    _check_png(tmp_path / "out/table2_generation/samples.png")
    r2 = (tmp_path / "out/table2_generation/reading.md").read_text()
    assert "lowest gFID is at s=4.5 (" in r2 and "tau=0" in r2, r2
    print(f"rendered {len(NOTEBOOKS)} notebooks in {time.time() - t0:.1f}s")


# --------------------------------------------------------------------------------------------
# Real runs (slow): `experiments/run.py SPEC --preset smoke --seeds 2` for every spec
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory) -> str:
    """A store made by the runner. Set SFTOK_ANALYSIS_SMOKE_STORE to reuse one (it must hold
    smoke runs of all five specs), else the specs are run here (several minutes)."""
    if os.environ.get("SFTOK_ANALYSIS_SMOKE_STORE"):
        return md.resolve_uri(os.environ["SFTOK_ANALYSIS_SMOKE_STORE"])
    root = tmp_path_factory.mktemp("smoke")
    for spec in md.SPECS:
        r = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), spec,
                            "--preset", "smoke", "--seeds", "2",
                            "--tracking-uri", str(root / "store"),
                            "--work-dir", str(root / "runs")],
                           cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
        assert r.returncode == 0, f"{spec}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return md.resolve_uri(root / "store")


@pytest.mark.slow
def test_render_on_smoke_runs(smoke_store, tmp_path):
    r = render([], smoke_store, tmp_path / "out", "--no-log")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in NOTEBOOKS:
        check_outputs(tmp_path / "out", name)
    f4a = pd.read_csv(tmp_path / "out/figure4_per_step/figure4a.csv")
    assert set(f4a["quantity"]) == set(TRACE_QUANTITIES)
    assert f4a["arm"].nunique() == 2 and sorted(set(f4a["step"])) == list(range(1, 9))
    f8 = pd.read_csv(tmp_path / "out/figure8_step_sweep/figure8.csv")
    assert sorted(set(f8["steps"])) == list(STEPS) and "psnr" in set(f8["metric"])
    t1 = pd.read_csv(tmp_path / "out/table1_reconstruction/table1.csv")
    ours = t1[~t1["source"].isin(["paper", "ours (same images)"])]  # not the floors / ceiling
    assert len(ours) == 1 and ours["psnr_mean"].notna().iloc[0]
    assert (t1["source"] == "ours (same images)").sum() == len(md.BOUNDS)


def _bounds_only(**values):
    """A real Campaign of two trials holding only the given metrics (floor / ceiling columns)."""
    runs = pd.DataFrame({f"metrics.{k}": [v, v] for k, v in values.items()}, index=[0, 1])
    return md.Campaign("spec", "", "", None, runs)


def test_bounds_reading_places_arms_and_says_what_a_weak_ceiling_means():
    # PSNR, higher is better: floor 20, ceiling 30 -> an arm at 25 is half-way, one at 18 below.
    camp = _bounds_only(**{"eval/floor_tokenizer_psnr": 20.0, "eval/teacher_psnr": 30.0})
    text = md.bounds_reading(camp, "psnr", {"a": 25.0, "b": 18.0})
    assert "a at 50%" in text and "b at -20%" in text
    assert "1 of 2 arm(s) are below the floor" in text and "under-trained tokenizer" in text
    assert "below the floor" not in md.bounds_reading(camp, "psnr", {"a": 25.0})
    # The ceiling under the floor: how far below the ceiling the arms are, and what that means.
    weak = _bounds_only(**{"eval/floor_tokenizer_psnr": 22.7, "eval/teacher_psnr": 22.5})
    text = md.bounds_reading(weak, "psnr", {"a": 16.5, "b": 14.5, "nan": float("nan")})
    assert "The ceiling is not above the floor" in text
    assert "stand 6 to 8 below the ceiling" in text and "under-trained tokenizer" in text
    # rFID, lower is better: the arms are *above* the ceiling's value.
    rfid = _bounds_only(**{"eval/floor_tokenizer_rfid": 3.0, "eval/teacher_rfid": 5.0})
    assert "stand 1 to 2 above the ceiling" in md.bounds_reading(rfid, "rfid", {"a": 6.0, "b": 7.0})
    assert "stand 5 below the ceiling" in md.bounds_reading(weak, "psnr", {"a": 17.5})
    assert "No floor/ceiling" in md.bounds_reading(_bounds_only(), "psnr", {"a": 1.0})
