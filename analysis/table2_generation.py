# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Table 2 — class-conditional generation on the tokenizer's tokens
#
# Paper (arXiv 2512.16910, Table 2, §4.3; ImageNet 256, class-conditional, 8 sampling steps):
# a MaskGIT generator trained on SFTok tokens reaches gFID 2.32 (SFTok-B) and 2.29 (SFTok-L).
# Here: gFID / IS of the trials of the latest (or a chosen) parent run of the spec `generation`,
# beside the paper's rows, with two calibration rows measured against the same reference
# statistics — real held-out images and the tokenizer's reconstructions of real tokens (what a
# perfect generator of these tokens would score). Then the guidance sweep (spec
# `generation_guidance_sweep`: guidance scale × schedule × temperature) and a grid of samples,
# one row per class. Rendered by `python analysis/render.py table2_generation`.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
parent = "latest"  # parent run id of a `generation` invocation, or "latest"
sweep_parent = "latest"  # parent run of `generation_guidance_sweep`; None: skip the sweep
out_dir = None  # None: analysis/out/table2_generation

# %%
import json
import os
import sys

sys.path[:0] = [p for p in (os.path.abspath("."), os.path.abspath("analysis"))
                if os.path.exists(os.path.join(p, "mlflow_data.py"))]

import matplotlib.pyplot as plt
import mlflow_data as md
import pandas as pd
import stats
from IPython.display import Image, Markdown, display

from sftok import run_record as rr

SPEC, SWEEP_SPEC = "generation", "generation_guidance_sweep"
camp, out = md.open_notebook("table2_generation", SPEC, tracking_uri, parent, out_dir)
display(Markdown(camp.describe()))
paper = md.paper_results()["table2_generation"]

# Columns of our rows: metric -> (label, lower is better)
OURS = {"gfid": ("gFID", True), "is": ("IS", False),
        "calib_fid_heldout": ("FID real held-out", True),
        "calib_fid_recon": ("FID recon. of real tokens", True),
        "sample_codebook_usage": ("code usage (samples)", False),
        "data_codebook_usage": ("code usage (data)", False)}

# %% [markdown]
# ## Our generator(s) beside the paper's table

# %%
runs = camp.runs.assign(
    tokens=camp.column("tokenizer.num_latent_tokens"),
    codebook=camp.column("tokenizer.quantizer.codebook_size"),
    per_class=camp.column("generation.eval.samples_per_class"),
    scale=camp.column("generation.sampling.guidance_scale"),
    schedule=camp.column("generation.sampling.guidance_schedule"),
    tau=camp.column("generation.sampling.temperature"))
present = [k for k in OURS if md.has_metric(camp, md.eval_key(k))]
missing = [k for k in ("gfid", "is", "calib_fid_heldout", "calib_fid_recon") if k not in present]
if not present:
    raise md.RunsNotFound(SPEC, camp.tracking_uri, f"the trials of parent run {camp.parent_id} "
                          f"logged none of eval/{{{','.join(OURS)}}}")

rows, md_rows, ivs = [], [], {}
for arm, g in runs.groupby("arm", sort=True):
    first = g.iloc[0]
    row = {"model": f"ours · {arm}", "source": f"ours ({camp.preset or '?'} preset)",
           "tokens": first["tokens"], "codebook": first["codebook"],
           "guidance": f"s={md.fmt_num(first['scale'])} {first['schedule']}, "
                       f"tau={md.fmt_num(first['tau'])}",
           "samples_per_class": first["per_class"], "n_seeds": int(g["seed"].nunique())}
    mrow = {"model": row["model"], "source": row["source"], "tokens": md.fmt_num(row["tokens"]),
            "codebook": md.fmt_num(row["codebook"]), "guidance": row["guidance"],
            "seeds": str(row["n_seeds"])}
    for k, (label, _) in OURS.items():
        key = f"metrics.{md.eval_key(k)}"
        iv = stats.mean_ci(pd.to_numeric(g[key]) if key in g else [])
        ivs[(arm, k)] = iv
        row.update({f"{k}_mean": iv.mean, f"{k}_ci_low": iv.low, f"{k}_ci_high": iv.high})
        mrow[label] = iv.fmt(3) if iv.n else "n/a"
    rows.append(row)
    md_rows.append(mrow)
for name, gfid in paper.items():
    rows.append({"model": name, "source": "paper", "gfid_mean": gfid})
    md_rows.append({"model": name, "source": "paper", "tokens": "—", "codebook": "—",
                    "guidance": "—", "seeds": "—",
                    **{label: (f"{gfid:.2f}" if k == "gfid" else "—")
                       for k, (label, _) in OURS.items()}})
table = pd.DataFrame(rows)
notes = [(f"Table 2 — class-conditional generation ({camp.describe()}); ours: mean ± 95% CI "
          "over seeds (one seed: the value alone). The calibration columns are FIDs against "
          "the same reference statistics as gFID: real held-out images and reconstructions of "
          "real tokens bound what a generator of these tokens can reach.")]
if missing:  # one sentence per distinct reason (offline, all four share one)
    why: dict[str, list[str]] = {}
    for k in missing:
        reason = camp.why_missing("calibration" if k.startswith("calib") else k)
        why.setdefault(reason.rstrip("."), []).append(OURS[k][0])
    notes.append("Unavailable here (n/a): " + "; ".join(
        f"{', '.join(labels)} — {reason}" for reason, labels in why.items()) + ".")
display(Markdown(out.table("table2", table, " ".join(notes), md=pd.DataFrame(md_rows))))

# %% [markdown]
# ## Guidance sweep (scale × schedule × temperature)

# %%
sweep_note = ""
sweep = pd.DataFrame()
if sweep_parent is not None:
    try:
        scamp = md.load_campaign(SWEEP_SPEC, tracking_uri, sweep_parent)
        out.campaign(scamp)
        # eval/sweep/<schedule>/s<s>/tau<tau>/<metric> (each trial's sweep.csv holds the same)
        long = []
        for _, r in scamp.runs.iterrows():
            for k in scamp.metric_keys(rr.EVAL):
                point = rr.parse_sweep_metric(rr.eval_name(k))
                v = r.get(f"metrics.{k}")
                if point and pd.notna(v):
                    long.append({"arm": r["arm"], "seed": r["seed"], **point,
                                 "value": float(v)})
        if long:
            sweep = pd.DataFrame(long).pivot_table(
                index=["arm", "seed", "schedule", "scale", "temperature"], columns="metric",
                values="value").reset_index()
        else:
            sweep_note = (f"the trials of {SWEEP_SPEC} parent {scamp.parent_id} logged no "
                          "eval/sweep/* metrics")
    except md.RunsNotFound as e:
        sweep_note = (f"no `{SWEEP_SPEC}` runs ({str(e).splitlines()[0]}); run "
                      f"`python experiments/run.py {SWEEP_SPEC}`")
else:
    sweep_note = "skipped (sweep_parent=None)"

if not sweep.empty:
    y = "gfid" if "gfid" in sweep and sweep["gfid"].notna().any() else "sample_codebook_usage"
    ylabel = ("gFID (lower is better)" if y == "gfid" else
              "code usage of the samples (proxy)")
    summ = stats.summarize(sweep, ["schedule", "scale", "temperature"], y)
    taus = sorted(summ["temperature"].unique())
    fig, axes = plt.subplots(1, len(taus), figsize=(4.4 * len(taus), 3.6), squeeze=False)
    for ax, tau in zip(axes.ravel(), taus):
        for sched, d in summ[summ["temperature"] == tau].groupby("schedule"):
            d = d.sort_values("scale")
            ax.plot(d["scale"], d["mean"], "-o", ms=4, label=sched)
            if (d["n"] >= 2).any():
                ax.fill_between(d["scale"], d["ci_low"], d["ci_high"], alpha=0.2, linewidth=0)
        if y == "gfid":
            ax.axhline(paper["SFTok-B-MaskGIT"], color="k", ls="--", lw=1,
                       label="paper SFTok-B (s=4.5 constant, tau=1)")
        ax.set_xlabel("guidance scale s (cond + s (cond - uncond))")
        ax.set_ylabel(ylabel)
        ax.set_title(f"tau = {tau:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Guidance sweep ({SWEEP_SPEC}, {sweep['seed'].nunique()} seed(s))"
                 + ("" if y == "gfid" else "; gFID unavailable, code usage as a proxy"),
                 fontsize=11)
    fig.tight_layout()
    display(Image(filename=str(out.figure("guidance_sweep", fig))))
    plt.close(fig)
    stable = summ.rename(columns={"mean": f"{y}_mean"})
    display(Markdown(out.table(
        "guidance_sweep", stable,
        f"Guidance sweep: {md.metric_label(y) if y != 'gfid' else 'gFID'} per (schedule, "
        f"scale, tau), mean ± 95% CI over seeds." + ("" if y == "gfid" else
        " gFID was unavailable, so the code usage of the samples stands in: it shows how "
        "guidance narrows the samples, not their quality."))))
else:
    display(Markdown(f"Guidance sweep: {sweep_note}."))

# %% [markdown]
# ## Samples, one row per class

# %%
rid = camp.runs["run_id"].iloc[0]
info = json.loads(camp.artifact_text(rid, rr.GENERATION_JSON) or "{}")
grid_png = None
with __import__("tempfile").TemporaryDirectory() as d:
    try:
        grid_png = plt.imread(camp.client.download_artifacts(rid, rr.samples_grid(), d))
    except Exception:  # noqa: BLE001 — absent artifact
        grid_png = None
if grid_png is not None:
    names = info.get("class_names", {})
    classes = info.get("grid_classes", [])
    fig, ax = plt.subplots(figsize=(min(12, 1.2 + grid_png.shape[1] / 40),
                                    min(12, 0.6 + grid_png.shape[0] / 40)))
    ax.imshow(grid_png)
    n = max(len(classes), 1)
    ax.set_yticks([(i + 0.5) * grid_png.shape[0] / n for i in range(len(classes))],
                  [names.get(str(c), str(c)) for c in classes])
    ax.set_xticks([])
    ax.set_xlabel("samples")
    ax.set_ylabel("class")
    s = info.get("sampling", {})
    ax.set_title(f"{camp.runs['arm'].iloc[0]} seed {camp.runs['seed'].iloc[0]}: "
                 f"s={s.get('guidance_scale')} {s.get('guidance_schedule')}, "
                 f"tau={s.get('temperature')}, {s.get('steps')} steps")
    display(Image(filename=str(out.figure("samples", fig))))
    plt.close(fig)
else:
    display(Markdown(f"No sample grid was logged (`{rr.samples_grid()}`)."))

# %% [markdown]
# ## Reading

# %%
sentences = []
ref = paper["SFTok-B-MaskGIT"]
scale_note = ("" if camp.preset in ("sftok-b", "sftok-l") else
              " — this preset is not the paper's setting (data, resolution, model and class "
              "count differ), so the comparison is indicative only")
for arm in sorted(runs["arm"].unique()):
    g, rec = ivs[(arm, "gfid")], ivs[(arm, "calib_fid_recon")]
    head = f"`{arm}` ({camp.preset or '?'} preset, {g.n or len(camp.seeds)} seed(s))"
    if g.n:
        text = f"{head} reaches gFID {g.fmt(2)} against SFTok-B's {ref:.2f}{scale_note}"
        if rec.n:
            text += (f"; the tokenizer's own reconstructions of real tokens score "
                     f"{rec.fmt(2)}, the floor a generator of these tokens can reach")
        sentences.append(text + ".")
    else:
        usage = ivs[(arm, "sample_codebook_usage")]
        data_usage = ivs[(arm, "data_codebook_usage")]
        extra = (f"; measured instead: the samples use {usage.fmt(3)} of the codebook, the "
                 f"training tokens {data_usage.fmt(3)}" if usage.n and data_usage.n else "")
        sentences.append(f"{head}: gFID is unavailable ({camp.why_missing('gfid')}), so it cannot "
                         f"be set against the paper's {ref:.2f}{extra}.")
if not sweep.empty:
    y = "gfid" if "gfid" in sweep and sweep["gfid"].notna().any() else "sample_codebook_usage"
    summ = stats.summarize(sweep, ["schedule", "scale", "temperature"], y)
    best = summ.loc[summ["mean"].idxmin() if y == "gfid" else summ["mean"].idxmax()]
    sentences.append(
        f"In the guidance sweep the {'lowest gFID' if y == 'gfid' else 'widest code usage'} "
        f"is at s={best['scale']:g} ({best['schedule']}, tau={best['temperature']:g}): "
        f"{best['mean']:.3g}" + ("" if y == "gfid" else
                                 " (a proxy: gFID was unavailable)") + ".")
elif sweep_note:
    sentences.append(f"Guidance sweep: {sweep_note}.")
reading = " ".join(sentences)
out.reading(reading)
display(Markdown(reading))
