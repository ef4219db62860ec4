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
# # Table 3 — vanilla vs SFVR training, with and without warm-up
#
# Paper (arXiv 2512.16910, Table 3; SFTok-B, 1000k steps in total, no stage 3): vanilla
# MaskGIT-style training rFID 6.47, SFVR 4.40, warm-up + SFVR 4.33. Here: the trials of the
# latest (or a chosen) parent run of the spec `ablation_sfvr_warmup` (same total step budget per
# arm), mean ± 95% CI over seeds and paired differences over common seeds. An arm's strategy is
# its stage-2 `replacement`; it has a warm-up when it logged stage-1 training metrics.
# Rendered by `python analysis/render.py table3_sfvr_warmup`.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
parent = "latest"  # parent run id of an `ablation_sfvr_warmup` invocation, or "latest"
out_dir = None  # None: analysis/out/table3_sfvr_warmup
steps = 8  # decode steps S of the table (the paper's 8; the largest evaluated if absent)

# %%
import os
import sys

sys.path[:0] = [p for p in (os.path.abspath("."), os.path.abspath("analysis"))
                if os.path.exists(os.path.join(p, "mlflow_data.py"))]

import mlflow_data as md
import pandas as pd
import stats
from IPython.display import Markdown, display

SPEC = "ablation_sfvr_warmup"
camp, out = md.open_notebook("table3_sfvr_warmup", SPEC, tracking_uri, parent, out_dir)
display(Markdown(camp.describe()))

# %% [markdown]
# ## Our runs beside the paper's

# %%
S = md.choose_steps(camp, steps)
metric, key = md.choose_metric(camp, S)
hib = md.higher_is_better(metric)
label = md.metric_label(metric)


runs = camp.runs.assign(strategy=camp.column("train.stage2.replacement").astype(str),
                        warmup=["stage1" in st for st in camp.trained_stages()],
                        value=pd.to_numeric(camp.column(key)))
paper = {(r["strategy"], bool(r["warmup"])): r["rfid"]
         for r in md.paper_results()["table3_sfvr_warmup"]}

rows, ivs = [], {}
for arm, g in runs.groupby("arm", sort=False):
    iv = stats.mean_ci(g["value"])
    ivs[arm] = iv
    strat, warm = g["strategy"].iloc[0], bool(g["warmup"].iloc[0])
    rows.append({"arm": arm, "strategy": strat, "warmup": warm, "n_seeds": iv.n, "metric": key,
                 "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high,
                 "paper_rfid": paper.get((strat, warm))})
# Paper rows we have no arm for are kept, with our columns empty.
for (strat, warm), v in paper.items():
    if not any(r["strategy"] == strat and r["warmup"] == warm for r in rows):
        rows.append({"arm": None, "strategy": strat, "warmup": warm, "n_seeds": 0, "metric": key,
                     "mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                     "paper_rfid": v})
table = pd.DataFrame(rows).sort_values(["warmup", "strategy"], ascending=[True, False],
                                       kind="stable").reset_index(drop=True)
md_table = pd.DataFrame({
    "arm": table["arm"].fillna("—"),
    "strategy": table["strategy"],
    "warm-up": ["✓" if w else "✗" for w in table["warmup"]],
    "seeds": table["n_seeds"].astype(str),
    f"ours: {label} @ {S} steps (mean ± 95% CI)": [
        ivs[a].fmt(3) if a in ivs else "—" for a in table["arm"]],
    "paper rFID": ["—" if pd.isna(v) else f"{v:.2f}" for v in table["paper_rfid"]],
})
# The naive-codec floors and the teacher ceiling of the same images, beside the arms.
md_table = md.with_bounds(md_table, camp, metric, f"ours: {label} @ {S} steps (mean ± 95% CI)")
caption = (f"Table 3 — training strategy and warm-up ({camp.describe()}). "
           f"{md.unavailable_note(camp, 'rfid', metric)}").strip()
display(Markdown(out.table("table3", table, caption, md=md_table)))

# %% [markdown]
# ## Paired differences (same seed)
# The paper's two comparisons: SFVR − vanilla (both without warm-up) and warm-up + SFVR − SFVR.

# %%
arm_of = {(r["strategy"], r["warmup"]): r["arm"] for r in rows if r["arm"] is not None}
wanted = [(("vanilla", False), ("sfvr", False)), (("sfvr", False), ("sfvr", True))]
pairs = [(arm_of[a], arm_of[b]) for a, b in wanted if a in arm_of and b in arm_of]
paper_diff = [paper[b] - paper[a] for a, b in wanted if a in arm_of and b in arm_of]
pt = stats.paired_table(runs, "arm", "seed", "value", pairs)
pt.insert(2, "metric", key)
pt["paper_rfid_diff"] = paper_diff if len(pt) else []
md_pt = pd.DataFrame({
    "comparison": [f"{b} − {a}" for a, b in zip(pt.get("a", []), pt.get("b", []))],
    "common seeds": pt.get("n_common_seeds", pd.Series(dtype=int)).astype(str),
    f"Δ {label} (95% CI)": [stats.format_ci(m, (h - l) / 2, 3) for m, l, h in
                            zip(pt.get("diff_mean", []), pt.get("ci_low", []),
                                pt.get("ci_high", []))],
    "p (paired t)": [stats.format_p(p) for p in pt.get("p_value", [])],
    "paper Δ rFID": [f"{v:+.2f}" for v in pt.get("paper_rfid_diff", [])],
})
display(Markdown(out.table("table3_paired", pt, f"Paired differences of {key}; negative = "
                           f"{'worse' if hib else 'better'} for the second arm.", md=md_pt)))

# %% [markdown]
# ## Reading

# %%
def better(d: float) -> bool:
    """A difference b − a means b is better."""
    return d > 0 if hib else d < 0


sentences = [f"Measured by {label} at {S} decode steps over {len(camp.seeds)} seed(s)"
             + (" (rFID unavailable, so only the direction of the paper's effects can be "
                "compared)" if metric != "rfid" else "") + ":"]
names = {"vanilla": "vanilla", "sfvr": "SFVR"}
for (a, b), r, pdiff in zip(pairs, pt.itertuples(), paper_diff):
    if pd.isna(r.diff_mean):  # no common seed with a finite value in both arms
        sentences.append(f"{b} vs {a}: the paper finds {b} {'better' if pdiff < 0 else 'worse'} "
                         f"(Δ rFID {pdiff:+.2f}); ours is undetermined (no seed has a finite "
                         f"{label} in both arms) — the paper's direction is undetermined.")
        continue
    same = better(r.diff_mean) == (pdiff < 0)
    s = (f"{b} vs {a}: the paper finds {b} {'better' if pdiff < 0 else 'worse'} "
         f"(Δ rFID {pdiff:+.2f}); ours finds it {'better' if better(r.diff_mean) else 'worse'} "
         f"(Δ {r.diff_mean:+.3g}")
    if r.n_common_seeds >= 2:
        s += (f", 95% CI [{r.ci_low:+.3g}, {r.ci_high:+.3g}], which "
              f"{'excludes' if r.excludes_zero else 'includes'} 0")
    s += f") — the paper's direction is {'reproduced' if same else 'not reproduced'}"
    if r.n_common_seeds >= 2 and not r.excludes_zero:
        s += " but not distinguishable from seed noise"
    sentences.append(s + ".")
missing = [f"{'warm-up + ' if w else ''}{names.get(st, st)}" for (st, w) in paper
           if (st, w) not in arm_of]
if missing:
    sentences.append(f"No arm of this run corresponds to {', '.join(missing)}.")
if len(ivs) >= 2 and len(camp.seeds) >= 2:
    ranked = sorted((a for a in ivs if ivs[a].n), key=lambda a: ivs[a].mean, reverse=hib)
    pairs_r = [(x, y) for i, x in enumerate(ranked) for y in ranked[i + 1:]]
    overl = [f"{x}/{y}" for x, y in pairs_r if ivs[x].overlaps(ivs[y]) is True]
    undet = [f"{x}/{y}" for x, y in pairs_r if ivs[x].overlaps(ivs[y]) is None]
    sentences.append(f"Best to worst: {' > '.join(ranked)}; the per-arm 95% intervals "
                     + (f"overlap for {', '.join(overl)}" if overl else
                        "are disjoint" if not undet else "are otherwise disjoint")
                     + (f"; undetermined (n < 2) for {', '.join(undet)}" if undet else "") + ".")
sentences.append(md.bounds_reading(camp, metric, {a: ivs[a].mean for a in ivs if ivs[a].n},
                                   fmt=lambda a: f"`{a}`"))
reading = " ".join(sentences)
out.reading(reading)
display(Markdown(reading))
