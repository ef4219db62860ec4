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
# # Figure 8 — reconstruction quality against the number of decode steps
#
# Paper (arXiv 2512.16910, Figure 8; SFTok-B): rFID falls and IS rises from 1 to 8 decode
# steps, and 16 steps adds little. Figure 8 evaluates the full three-stage model (Figure 7 the
# stage-2 one), so the paper comparison below uses the trials that trained stage 3; stage-2
# trials are shown beside them (Figure 7's model). Each model is evaluated at the decoding
# temperature tau of its arm (0 = argmax; 1 = the paper's Table 6 setting); arms of one model
# and seed train identically, so tau's effect is a paired difference over seeds.
# Here: `eval/<metric>_s<S>` of the trials of the latest (or a chosen) parent run of the spec
# `step_sweep`, mean ± 95% CI over seeds, every metric that was logged (rFID and IS need local
# Inception weights; offline they are reported unavailable and the other metrics are plotted).
# Rendered by `python analysis/render.py figure8_step_sweep`.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
parent = "latest"  # parent run id of a `step_sweep` invocation, or "latest"
out_dir = None  # None: analysis/out/figure8_step_sweep

# %%
import os
import sys

sys.path[:0] = [p for p in (os.path.abspath("."), os.path.abspath("analysis"))
                if os.path.exists(os.path.join(p, "mlflow_data.py"))]

import math

import matplotlib.pyplot as plt
import mlflow_data as md
import pandas as pd
import stats
from IPython.display import Image, Markdown, display

SPEC = "step_sweep"
WANTED = ["rfid", "is", "psnr", "ssim", "lpips"]
camp, out = md.open_notebook("figure8_step_sweep", SPEC, tracking_uri, parent, out_dir)
display(Markdown(camp.describe()))
paper_is = {int(k): v for k, v in md.paper_results()["figure8_step_sweep"]["inception_score"].items()}

# %% [markdown]
# ## Metrics against decode steps

# %%
# Which model each trial evaluated (its last trained stage) and at which temperature.
model_of = {i: ("stage 3" if "stage3" in st else "stage 2")
            for i, st in camp.trained_stages().items()}
tau_of = pd.to_numeric(camp.column("decode.temperature"), errors="coerce")
rows = []
for metric in WANTED:
    for S in md.eval_steps(camp, metric):
        vals = pd.to_numeric(camp.column(md.eval_key(metric, S)))
        for (i, r), v in zip(camp.runs.iterrows(), vals):
            rows.append({"metric": metric, "steps": S, "arm": r["arm"], "seed": r["seed"],
                         "model": model_of[i], "tau": tau_of[i], "value": v})
long = pd.DataFrame(rows, columns=["metric", "steps", "arm", "seed", "model", "tau", "value"])
fig8_arms = sorted(long.loc[long["model"] == "stage 3", "arm"].astype(str).unique())
present = [m for m in WANTED if m in set(long["metric"])]
missing = [m for m in WANTED if m not in present]
if not present:
    raise md.RunsNotFound(SPEC, camp.tracking_uri, f"the trials of parent run {camp.parent_id} "
                          f"logged none of eval/{{{','.join(WANTED)}}}_s<S>")
missing_note = "; ".join(f"{md.metric_label(m)}: {camp.why_missing(m)}" for m in missing)
summary = stats.summarize(long, ["arm", "metric", "steps"], "value")
arms = sorted(summary["arm"].astype(str).unique())

ncol = min(3, len(present))
nrow = math.ceil(len(present) / ncol)
fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.6 * nrow), squeeze=False)
colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
for ax, metric in zip(axes.ravel(), present):
    for arm in arms:
        d = summary[(summary["arm"] == arm) & (summary["metric"] == metric)].sort_values("steps")
        ax.plot(d["steps"], d["mean"], "-o", ms=4, color=colors[arm], label=f"ours · {arm}")
        if (d["n"] >= 2).any():
            ax.fill_between(d["steps"], d["ci_low"], d["ci_high"], color=colors[arm], alpha=0.2,
                            linewidth=0)
    if metric == "is":
        ax.plot(list(paper_is), list(paper_is.values()), "k--s", ms=4, label="paper (SFTok-B)")
    bounds = md.bound_values(camp, metric)  # naive-codec floors and the teacher ceiling
    for prefix, style in (("floor_tokenizer", ":"), ("teacher", "--")):
        if prefix in bounds:
            ax.axhline(bounds[prefix], color="grey", linestyle=style, linewidth=1,
                       label=md.BOUNDS[prefix].split(":")[0])
    ax.set_xscale("log", base=2)
    ticks = sorted(set(summary["steps"]))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("decode steps S")
    ax.set_ylabel(f"{md.metric_label(metric)} ({'higher' if md.higher_is_better(metric) else 'lower'}"
                  " is better)")
    ax.set_title(md.metric_label(metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
for ax in axes.ravel()[len(present):]:
    ax.set_visible(False)
fig.suptitle(f"Figure 8 — reconstruction vs decode steps (mean ± 95% CI over "
             f"{len(camp.seeds)} seed(s))" + (f"; missing: {', '.join(map(md.metric_label, missing))}"
                                             if missing else ""), fontsize=11)
fig.tight_layout()
display(Image(filename=str(out.figure("figure8", fig))))
plt.close(fig)

# %% [markdown]
# ## Table

# %%
table = summary[["arm", "metric", "steps", "n", "mean", "ci_low", "ci_high"]].copy()
table["paper"] = [paper_is.get(int(s)) if m == "is" else None
                  for m, s in zip(table["metric"], table["steps"])]
cells = summary.assign(cell=[stats.format_ci(m, h, 3) for m, h in
                             zip(summary["mean"], summary["ci_half"])])
md_table = cells.pivot_table(index=["arm", "steps"], columns="metric", values="cell",
                             aggfunc="first")[present].reset_index()
md_table.columns = ["arm", "decode steps"] + [md.metric_label(m) for m in present]
md_table["decode steps"] = md_table["decode steps"].astype(str)
md_table["paper IS"] = [f"{paper_is[int(s)]:.1f}" if int(s) in paper_is else "—"
                        for s in md_table["decode steps"]]
caption = (f"Figure 8 values ({camp.describe()}); mean ± 95% CI over seeds. "
           + (f"Missing metrics — {missing_note}." if missing else "All metrics present."))
display(Markdown(out.table("figure8", table, caption, md=md_table)))

# %% [markdown]
# ## Decoding temperature: tau = 1 minus tau = 0
#
# Per model, metric and S: the paired difference (over seeds) of the arm at tau = 1 (the paper's
# "randomize temperature") minus the arm at tau = 0 (argmax).

# %%
taus = sorted(t for t in long["tau"].dropna().unique())
tau_rows = []
if len(taus) >= 2 and 0.0 in taus and 1.0 in taus:
    for (model, metric, S), sub in long.dropna(subset=["tau"]).groupby(["model", "metric",
                                                                         "steps"]):
        p = stats.paired_diff(sub, "tau", "seed", "value", 0.0, 1.0)
        tau_rows.append({"model": model, "metric": metric, "steps": int(S),
                         "n_common_seeds": p.diff.n, "diff_mean": p.diff.mean,
                         "ci_low": p.diff.low, "ci_high": p.diff.high, "p_value": p.p_value})
tau_table = pd.DataFrame(tau_rows, columns=["model", "metric", "steps", "n_common_seeds",
                                            "diff_mean", "ci_low", "ci_high", "p_value"])
if len(tau_table):
    md_tau = tau_table[["model", "metric", "steps", "n_common_seeds"]].assign(
        metric=[md.metric_label(m) for m in tau_table["metric"]],
        **{"tau 1 − tau 0 (95% CI)": [
            f"{m:+.3g} [{lo:+.3g}, {hi:+.3g}]" if n >= 2 else f"{m:+.3g}" for m, lo, hi, n in
            zip(tau_table["diff_mean"], tau_table["ci_low"], tau_table["ci_high"],
                tau_table["n_common_seeds"])],
           "p": [stats.format_p(p) for p in tau_table["p_value"]]})
    display(Markdown(out.table("figure8_temperature", tau_table,
                               "tau = 1 minus tau = 0, paired over seeds (95% CI)", md=md_tau)))
    s8 = tau_table[(tau_table["steps"] == 8) & (tau_table["model"] == "stage 3")]
    s8 = s8 if len(s8) else tau_table[tau_table["steps"] == tau_table["steps"].max()]
    tau_note = "Temperature (tau 1 − 0) at S = {}: ".format(int(s8["steps"].iloc[0])) + "; ".join(
        f"{md.metric_label(r.metric)} {r.diff_mean:+.3g} ({r.model})" for r in s8.itertuples())
    tau_note += "."
else:
    tau_note = ("Only one decoding temperature was evaluated (tau values: "
                f"{', '.join(map(str, taus)) or 'not logged'}); no tau comparison.")
    display(Markdown(tau_note))

# %% [markdown]
# ## Reading

# %%
def direction(metric, a, b, arm):
    """(verdict, paired diff, text) from S=a to S=b: verdict 'improves' / 'worsens' /
    'unchanged' by the mean (the text adds the paired CI when possible), or 'undetermined'
    when no seed has finite values at both step counts."""
    sub = long[(long["metric"] == metric) & (long["arm"] == arm)]
    p = stats.paired_diff(sub, "steps", "seed", "value", a, b)
    if p.diff.n == 0:
        return "undetermined", p, (f"is undetermined from {a} to {b} steps (no seed has finite "
                                   f"values at both)")
    if p.diff.mean == 0:
        return "unchanged", p, f"is unchanged (Δ 0 over {p.diff.n} seed(s))"
    good = p.diff.mean > 0 if md.higher_is_better(metric) else p.diff.mean < 0
    sig = ""
    if p.diff.n >= 2:
        sig = (f", 95% CI [{p.diff.low:+.3g}, {p.diff.high:+.3g}]"
               + ("" if p.excludes_zero else ", not distinguishable from 0"))
    return ("improves" if good else "worsens"), p, \
        f"{'improves' if good else 'worsens'} (Δ {p.diff.mean:+.3g}{sig})"


def paper_claim(metric):
    """Does `metric` improve from 1 to 8 steps in every Figure-8 (stage-3) arm that evaluated
    both? (Figure 8 is the three-stage model; stage-2 arms are Figure 7's.)"""
    have = [a for a in fig8_arms
            if {1, 8} <= set(long[(long["arm"] == a) & (long["metric"] == metric)]["steps"])]
    if not have:
        return ("is undetermined (no stage-3 arm evaluated both S = 1 and S = 8; Figure 8 is "
                "the three-stage model)")
    res = [direction(metric, 1, 8, a) for a in have]
    if any(v == "undetermined" for v, _, _ in res):
        return "is undetermined (no seed has finite values at both S = 1 and S = 8)"
    if not all(v == "improves" for v, _, _ in res):
        return "does not improve"
    if all(p.excludes_zero for _, p, _ in res):
        return "improves (paired CI excludes 0)"
    return "mean improves but within seed noise (paired CI includes 0 or under 2 seeds)"


sentences = []
for arm in arms:
    parts = []
    for metric in present:
        steps_av = sorted(set(long[(long["arm"] == arm) & (long["metric"] == metric)]["steps"]))
        if len(steps_av) < 2:
            continue
        lo, mid = min(steps_av), (8 if 8 in steps_av else max(steps_av))
        _, _, d1 = direction(metric, lo, mid, arm)
        s = f"{md.metric_label(metric)} {d1} from {lo} to {mid} steps"
        if 16 in steps_av and mid == 8:
            v16, p16, _ = direction(metric, 8, 16, arm)
            base = summary[(summary["arm"] == arm) & (summary["metric"] == metric)
                           & (summary["steps"] == 8)]["mean"]
            base = (abs(float(base.iloc[0])) if len(base) else math.nan) or 1.0
            rel = abs(p16.diff.mean) / base
            if v16 == "undetermined" or math.isnan(rel):
                s += ", and the change from 8 to 16 steps is undetermined (no finite values)"
            else:
                if p16.diff.n >= 2 and not p16.excludes_zero:
                    verdict = "marginal: its paired 95% CI includes 0"
                elif rel < 0.01:
                    verdict = "marginal: under 1%"
                else:
                    verdict = "not marginal"
                s += (f", and 16 steps changes it by {p16.diff.mean:+.3g} ({rel:.1%} of the "
                      f"8-step value; {verdict})")
        parts.append(s)
    if parts:
        sentences.append(f"`{arm}`: " + "; ".join(parts) + ".")
if "rfid" in present or "is" in present:
    claims = []
    for metric in ("rfid", "is"):
        if metric in present:
            c = paper_claim(metric)
            claims.append(f"{md.metric_label(metric)} from 1 to 8 steps {c}"
                          + (" as in the paper" if c.startswith("improves") else
                             " (the paper: it improves)"))
    sentences.append("Against the paper: " + "; ".join(claims) + ".")
if not fig8_arms:
    sentences.append("No trial trained stage 3, so none of these arms is Figure 8's model "
                     "(the paper evaluates the three-stage model); they compare with Figure 7.")
if tau_note:
    sentences.append(tau_note)
if missing:
    sentences.append(f"Not available here: {missing_note} — the paper's rFID/IS curve can only be "
                     "compared through the metrics above.")
placed = next((m for m in md.PROXY_ORDER if m in present), None)
if placed is not None:
    evaluated = set(long[long["metric"] == placed]["steps"])
    at = max([s for s in evaluated if s <= 8] or evaluated)
    sub = summary[(summary["metric"] == placed) & (summary["steps"] == at)]
    sentences.append(f"At {at} decode steps: " + md.bounds_reading(
        camp, placed, dict(zip(sub["arm"], sub["mean"])), fmt=lambda a: f"`{a}`"))
reading = " ".join(sentences) or "Only one decode-step count was evaluated; nothing to compare."
out.reading(reading)
display(Markdown(reading))
