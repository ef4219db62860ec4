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
# # Figures 9–14 — stage-3 training losses
#
# Paper (arXiv 2512.16910, Figures 9–14, appendix): the curves of stage 3 (pixel-space
# fine-tuning) of SFTok: discriminator, GAN (generator), perceptual, quantizer, reconstruction
# and total loss, in that order. The paper gives no numbers for them; compare shapes. Here: the
# `train/stage3/<name>` histories of the trials of the latest (or a chosen) parent run of the
# spec `reconstruction`, mean ± 95% CI over seeds at each logged step, on the stage-3 step axis.
# A curve that was not logged is listed with the reason (e.g. the LPIPS term needs local VGG16
# weights; the GAN terms start at `gan_start`). Rendered by
# `python analysis/render.py figures9_14_stage3_losses`.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
parent = "latest"  # parent run id of a `reconstruction` invocation, or "latest"
out_dir = None  # None: analysis/out/figures9_14_stage3_losses

# %%
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

SPEC = "reconstruction"
# (figure, logged name under train/stage3/, what it is): sftok/train/stage3.py logs these.
CURVES = [("Figure 9", "gan_d", "discriminator loss (0.5·hinge)"),
          ("Figure 10", "gan_g", "GAN loss (generator hinge)"),
          ("Figure 11", "lpips", "perceptual loss (LPIPS)"),
          ("Figure 12", "quant_loss", "quantizer loss"),
          ("Figure 13", "l2", "reconstruction loss (L2)"),
          ("Figure 14", "loss", "total loss")]
camp, out = md.open_notebook("figures9_14_stage3_losses", SPEC, tracking_uri, parent, out_dir)
display(Markdown(camp.describe()))

# %% [markdown]
# ## Curves

# %%
def stage3_offset(row) -> int:
    """Global step at which the trial's stage 3 began (the runner logs global steps)."""
    stages = camp.trained_stages().loc[row.name]
    return int(sum(float(row.get(f"params.train.{s}.steps") or 0) for s in stages
                   if s in ("stage1", "stage2")))


offsets = {r["run_id"]: stage3_offset(r) for _, r in camp.runs.iterrows()}


def why_not_logged(name: str) -> str:
    """Why a stage-3 curve is absent, from the trials' configs."""
    col = camp.column
    if name == "lpips":
        w = pd.to_numeric(col("train.stage3.lpips_weight"), errors="coerce")
        if len(w) and (w == 0).all():
            return "lpips_weight = 0 in this campaign (e.g. the tiny preset)"
        return ("not logged: the LPIPS term was skipped (VGG16 weights absent offline; put "
                "vgg16-397923af.pth in torch's hub cache)")
    if name in ("gan_d", "gan_g"):
        w = pd.to_numeric(col("train.stage3.gan_weight"), errors="coerce")
        if len(w) and (w == 0).all():
            return "gan_weight = 0 in this campaign"
        return "not logged: stage 3 ended before gan_start (the GAN terms start there)"
    if not camp.trained_stages().map(lambda st: "stage3" in st).any():
        return "no trial of this campaign trained stage 3"
    return "not logged by these trials (older runner?)"


curves, missing = {}, {}
for fig_name, name, label in CURVES:
    h = camp.history(rr.train_key("stage3", name))
    if not len(h):
        missing[name] = why_not_logged(name)
        continue
    h["step"] = h["step"] - h["run_id"].map(offsets)
    curves[name] = h
if not curves:
    raise md.RunsNotFound(SPEC, camp.tracking_uri, f"the trials of parent run {camp.parent_id} "
                          "logged no train/stage3/* history (run the spec with stage 3)")

fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
summaries = []
for ax, (fig_name, name, label) in zip(axes.ravel(), CURVES):
    ax.set_title(f"{fig_name}: {label}", fontsize=9)
    ax.set_xlabel("stage-3 optimiser step")
    ax.set_ylabel(name)
    if name not in curves:
        ax.text(0.5, 0.5, "not logged:\n" + missing[name].split(":")[0], ha="center",
                va="center", transform=ax.transAxes, fontsize=8, wrap=True)
        continue
    summ = stats.summarize(curves[name], ["arm", "step"], "value")
    summaries.append(summ.assign(curve=name, figure=fig_name))
    for arm, d in summ.groupby("arm"):
        d = d.sort_values("step")
        ax.plot(d["step"], d["mean"], "-", lw=1.2, label=f"ours · {arm}")
        if (d["n"] >= 2).any():
            ax.fill_between(d["step"], d["ci_low"], d["ci_high"], alpha=0.2, linewidth=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.suptitle(f"Figures 9–14 — stage-3 losses (mean ± 95% CI over {len(camp.seeds)} seed(s))",
             fontsize=11)
fig.tight_layout()
display(Image(filename=str(out.figure("figures9_14", fig))))
plt.close(fig)

# %% [markdown]
# ## First and last logged values

# %%
rows = []
for fig_name, name, label in CURVES:
    if name not in curves:
        rows.append({"figure": fig_name, "curve": name, "what": label, "logged": False,
                     "first_step": None, "first_mean": None, "last_step": None,
                     "last_mean": None, "last_ci_half": None, "n_seeds": 0,
                     "note": missing[name]})
        continue
    summ = stats.summarize(curves[name], "step", "value").sort_values("step")
    first, last = summ.iloc[0], summ.iloc[-1]
    rows.append({"figure": fig_name, "curve": name, "what": label, "logged": True,
                 "first_step": int(first["step"]), "first_mean": first["mean"],
                 "last_step": int(last["step"]), "last_mean": last["mean"],
                 "last_ci_half": last["ci_half"], "n_seeds": int(last["n"]), "note": ""})
table = pd.DataFrame(rows)
table[["first_step", "last_step"]] = table[["first_step", "last_step"]].astype("Int64")
md_table = table.assign(
    first=[md.fmt_num(v) for v in table["first_mean"]],
    last=[stats.format_ci(m, h, 4) if lg else "—" for m, h, lg in
          zip(table["last_mean"], table["last_ci_half"], table["logged"])])[
    ["figure", "what", "first_step", "first", "last_step", "last", "note"]]
display(Markdown(out.table("figures9_14", table, f"Stage-3 losses ({camp.describe()}).",
                           md=md_table)))

# %% [markdown]
# ## Reading

# %%
parts = []
for r in table.itertuples():
    if not r.logged:
        continue
    if r.first_step == r.last_step or any(pd.isna(v) for v in (r.first_mean, r.last_mean)):
        parts.append(f"{r.figure} ({r.curve}) has one logged value")
        continue
    trend = "falls" if r.last_mean < r.first_mean else "rises" if r.last_mean > r.first_mean \
        else "stays flat"
    parts.append(f"{r.figure} ({r.curve}) {trend} from {r.first_mean:.4g} (step "
                 f"{int(r.first_step)}) to {r.last_mean:.4g} (step {int(r.last_step)})")
reading = "Stage-3 losses: " + "; ".join(parts) + "."
if missing:
    reading += " Not logged: " + "; ".join(f"{k} — {v}" for k, v in missing.items()) + "."
reading += (" The paper shows these curves without numbers, for SFTok-B on ImageNet; ours come "
            f"from preset `{camp.preset}`, so only their shapes compare.")
out.reading(reading)
display(Markdown(reading))
