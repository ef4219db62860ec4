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
# # Table 4 — SFVR replacement ratio
#
# Paper (arXiv 2512.16910, Table 4): warm-up then SFVR with replacement ratio 0.5 / 0.8 / 1.0;
# rFID 4.96 / 4.59 / 4.33 — replacing *every* visible position with the step-1 prediction is
# best. Here: the trials of the latest (or a chosen) parent run of the spec
# `ablation_replace_ratio`, mean ± 95% CI over seeds, paired differences over common seeds.
# Rendered by `python analysis/render.py table4_replace_ratio`.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
parent = "latest"  # parent run id of an `ablation_replace_ratio` invocation, or "latest"
out_dir = None  # None: analysis/out/table4_replace_ratio
steps = 8  # decode steps S of the table (the paper's 8; the largest evaluated if absent)

# %%
import os
import sys

sys.path[:0] = [p for p in (os.path.abspath("."), os.path.abspath("analysis"))
                if os.path.exists(os.path.join(p, "mlflow_data.py"))]

import itertools

import mlflow_data as md
import pandas as pd
import stats
from IPython.display import Markdown, display

SPEC = "ablation_replace_ratio"
camp, out = md.open_notebook("table4_replace_ratio", SPEC, tracking_uri, parent, out_dir)
display(Markdown(camp.describe()))

# %% [markdown]
# ## Our runs beside the paper's

# %%
S = md.choose_steps(camp, steps)
metric, key = md.choose_metric(camp, S)
hib = md.higher_is_better(metric)
runs = camp.runs.assign(replace_ratio=pd.to_numeric(camp.column("train.stage2.replace_ratio")),
                        value=pd.to_numeric(camp.column(key)))
paper = {float(r["replace_ratio"]): r["rfid"] for r in md.paper_results()["table4_replace_ratio"]}

rows, ivs = [], {}
for ratio, g in runs.groupby("replace_ratio", sort=True):
    iv = stats.mean_ci(g["value"])
    ivs[ratio] = iv
    rows.append({"replace_ratio": ratio, "arm": ", ".join(sorted(map(str, g["arm"].unique()))),
                 "n_seeds": iv.n, "metric": key, "mean": iv.mean, "ci_low": iv.low,
                 "ci_high": iv.high, "paper_rfid": paper.get(float(ratio))})
table = pd.DataFrame(rows)
label = md.metric_label(metric)
ours_col = f"ours: {label} @ {S} steps (mean ± 95% CI)"
md_table = pd.DataFrame({
    "replace ratio": [md.fmt_num(r) for r in table["replace_ratio"]],
    "seeds": table["n_seeds"],
    ours_col: [ivs[r].fmt(3) for r in table["replace_ratio"]],
    "paper rFID": [("—" if pd.isna(v) else f"{v:.2f}") for v in table["paper_rfid"]],
})
# The naive-codec floors and the teacher ceiling of the same images, beside the arms.
md_table = md.with_bounds(md_table, camp, metric, ours_col)
caption = (f"Table 4 — replacement ratio of SFVR ({camp.describe()}). "
           f"{md.unavailable_note(camp, 'rfid', metric)}").strip()
display(Markdown(out.table("table4", table, caption, md=md_table)))

# %% [markdown]
# ## Paired differences (same seed, higher ratio minus lower ratio)

# %%
ratios = sorted(ivs)
pairs = list(itertools.combinations(ratios, 2))
pt = stats.paired_table(runs, "replace_ratio", "seed", "value", pairs)
pt.insert(2, "metric", key)
pt["paper_rfid_diff"] = [(paper[b] - paper[a]) if a in paper and b in paper else None
                         for a, b in zip(pt["a"], pt["b"])]
md_pt = pd.DataFrame({
    "comparison": [f"{md.fmt_num(b)} − {md.fmt_num(a)}" for a, b in zip(pt["a"], pt["b"])],
    "common seeds": pt["n_common_seeds"],
    f"Δ {label} (95% CI)": [stats.format_ci(m, (h - l) / 2, 3)
                            for m, l, h in zip(pt["diff_mean"], pt["ci_low"], pt["ci_high"])],
    "p (paired t)": [stats.format_p(p) for p in pt["p_value"]],
    "paper Δ rFID": [("—" if v is None or pd.isna(v) else f"{v:+.2f}")
                     for v in pt["paper_rfid_diff"]],
})
display(Markdown(out.table("table4_paired", pt, f"Paired differences of {key}; positive = "
                           f"{'better' if hib else 'worse'} for the higher ratio.", md=md_pt)))

# %% [markdown]
# ## Decode steps: S minus 1 (same trial)
#
# What multi-step decoding adds to each arm: the difference between its S-step and its 1-step
# reconstruction, per trial (so paired by construction), mean ± 95% CI over seeds.

# %%
key1 = md.eval_key(metric, 1)
steps_rows = []
if S != 1 and md.has_metric(camp, key1):
    runs["value_1"] = pd.to_numeric(camp.column(key1))
    runs["gain"] = runs["value"] - runs["value_1"]
    for ratio, g in runs.groupby("replace_ratio", sort=True):
        iv = stats.mean_ci(g["gain"].dropna())
        steps_rows.append({"replace_ratio": ratio, "metric": key, "minus": key1, "n": iv.n,
                           "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high,
                           "excludes_zero": bool(iv.n >= 2 and (iv.low > 0 or iv.high < 0))})
    steps_table = pd.DataFrame(steps_rows)
    md_steps = pd.DataFrame({
        "replace ratio": [md.fmt_num(r) for r in steps_table["replace_ratio"]],
        "seeds": steps_table["n"],
        f"Δ {label}, {S} − 1 steps (95% CI)": [
            stats.format_ci(m, (h - lo) / 2, 3) if n >= 2 else md.fmt_num(m)
            for m, lo, h, n in zip(steps_table["mean"], steps_table["ci_low"],
                                   steps_table["ci_high"], steps_table["n"])]})
    display(Markdown(out.table("table4_steps", steps_table,
                               f"{key} minus {key1} per trial; positive = "
                               f"{'better' if hib else 'worse'} with {S} steps.", md=md_steps)))
else:
    display(Markdown(f"No `{key1}` in these trials: the {S}-step gain over 1 step is not "
                     "available."))

# %% [markdown]
# ## Reading

# %%
ours_groups = stats.rank_groups({r: ivs[r].mean for r in ratios}, hib)
paper_groups = stats.rank_groups({r: paper[r] for r in ratios if r in paper}, False)
ours_on_paper = stats.rank_groups({r: ivs[r].mean for r in ratios if r in paper}, hib)
reproduced = ours_on_paper == paper_groups
ties = [g for g in ours_groups if len(g) > 1]
sentences = [(f"With {label} at {S} decode steps over {len(camp.seeds)} seed(s), the ratios rank "
              f"(best first) {stats.order_text(ours_groups, md.fmt_num)}; the paper's rFID ranks "
              f"{stats.order_text(paper_groups, md.fmt_num)}, so its ordering is "
              f"{'reproduced' if reproduced else 'not reproduced'}"
              + (f" (our means tie for {', '.join(' and '.join(map(md.fmt_num, g)) for g in ties)})"
                 if ties else "") + ".")]
if metric != "rfid":
    sentences.append(f"rFID was unavailable, so this compares orderings only, through {label}.")
if len(camp.seeds) < 2:
    sentences.append("With a single seed no confidence interval can be formed; the ordering "
                     "may be seed noise.")
else:
    overl = [f"{md.fmt_num(a)}/{md.fmt_num(b)}" for a, b in pairs
             if ivs[a].overlaps(ivs[b]) is True]
    undet = [f"{md.fmt_num(a)}/{md.fmt_num(b)}" for a, b in pairs
             if ivs[a].overlaps(ivs[b]) is None]  # an arm with < 2 finite seeds: no interval
    sentences.append("The 95% intervals " + (
        f"overlap for {', '.join(overl)}" if overl else
        "do not overlap for any pair" if not undet else
        "do not overlap for any other pair" if len(undet) < len(pairs) else "")
        + ("" if not undet else ("; " if overl or len(undet) < len(pairs) else "")
           + f"are undetermined (n < 2) for {', '.join(undet)}") + "; "
        + "; ".join(
            f"the paired difference {md.fmt_num(r.b)} − {md.fmt_num(r.a)} is "
            + (f"{r.diff_mean:+.3g} [{r.ci_low:+.3g}, {r.ci_high:+.3g}] "
               f"({'excludes' if r.excludes_zero else 'includes'} 0)"
               if r.n_common_seeds >= 2 else
               f"{r.diff_mean:+.3g} (undetermined (n < 2): {r.n_common_seeds} common seed(s))")
            for r in pt.itertuples()) + ".")
    # Is the paper's ordering supported beyond seed noise? Each adjacent pair (paper order),
    # better minus worse, must have a paired CI on the better side of 0.
    flat = [r for g in paper_groups for r in g]
    steps_ok = []
    for better_r, worse_r in itertools.pairwise(flat):
        d = stats.paired_diff(runs, "replace_ratio", "seed", "value", worse_r, better_r)
        steps_ok.append(d.excludes_zero and ((d.diff.mean > 0) == hib))
    sentences.append(
        "Every adjacent step of the paper's ordering is supported by a paired 95% CI that "
        "excludes 0 in the paper's direction." if steps_ok and all(steps_ok) else
        f"{sum(steps_ok)} of {len(steps_ok)} adjacent steps of the paper's ordering are supported "
        "by a paired 95% CI excluding 0 in the paper's direction; the rest are within seed noise "
        "or reversed.")
if steps_rows:
    sentences.append(
        f"{S} decode steps minus 1, per trial: " + "; ".join(
            f"ratio {md.fmt_num(r['replace_ratio'])} "
            + (f"{r['mean']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}] "
               f"({'excludes' if r['excludes_zero'] else 'includes'} 0)" if r["n"] >= 2
               else f"{r['mean']:+.3g} (one seed)")
            for r in steps_rows) + ".")
sentences.append(md.bounds_reading(camp, metric, {r: ivs[r].mean for r in ratios},
                                   fmt=lambda r: f"ratio {md.fmt_num(r)}"))
reading = " ".join(sentences)
out.reading(reading)
display(Markdown(reading))
