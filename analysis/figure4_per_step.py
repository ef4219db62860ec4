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
# # Figure 4 — per-step predictions (4a) and training loss with vs without warm-up (4b)
#
# **4a** (paper Figure 4a): at each decode step i of S, the distance of the step-i predictive
# distribution p_i to the ground-truth teacher ids M_g (KL = −log p_i[g]) and to the final
# prediction M̂_T (KL(p_T‖p_i)), and top-1 agreement with each, over all positions and over
# the positions still masked before step i. Source: `trace.csv` (or `trace/<name>` metrics) of
# the trials of spec `per_step_trace`. With it, the information revealed tokens give the
# decoder (`eval/reveal_*`, paper §3.2) and what it implies for the step sweep.
#
# **4b** (paper Figure 4b): the training reconstruction loss `train/<stage>/ce` against the
# global optimiser step, with vs without the single-step warm-up; trials of spec
# `ablation_sfvr_warmup`. Rendered by `python analysis/render.py figure4_per_step`.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
parent = "latest"  # parent run id of a `per_step_trace` invocation (4a), or "latest"
parent_4b = "latest"  # parent run id of an `ablation_sfvr_warmup` invocation (4b), or "latest"
out_dir = None  # None: analysis/out/figure4_per_step
loss = "ce"  # training metric of 4b: train/<stage>/<loss> ("loss" = CE + quantiser loss)

# %%
import os
import sys

sys.path[:0] = [p for p in (os.path.abspath("."), os.path.abspath("analysis"))
                if os.path.exists(os.path.join(p, "mlflow_data.py"))]

import itertools

import matplotlib.pyplot as plt
import mlflow_data as md
import numpy as np
import pandas as pd
import stats
from IPython.display import Image, Markdown, display

from sftok import run_record as rr

out = md.Outputs("figure4_per_step", out_dir)
camps = md.load_campaigns({"per_step_trace": parent, "ablation_sfvr_warmup": parent_4b},
                          tracking_uri)
trace_camp, train_camp = camps["per_step_trace"], camps["ablation_sfvr_warmup"]
for c in camps.values():
    out.campaign(c)
    display(Markdown(c.describe()))
paper_claim = md.paper_results()["figure4a_per_step"]["claim"]

# %% [markdown]
# ## 4a — distance of the step-i prediction to the ground truth and to the final prediction

# %%
traces = trace_camp.traces()
if traces.empty:
    raise md.RunsNotFound("per_step_trace", trace_camp.tracking_uri,
                          f"the trials of parent run {trace_camp.parent_id} logged no trace "
                          "(trace.csv or trace/* metrics)")
QUANTITIES = [f"{kind}_{ref}_{pos}" for kind in ("kl", "top1") for ref in ("gt", "final")
              for pos in ("all", "masked")]
present = [q for q in QUANTITIES if q in traces.columns]
absent = [q for q in QUANTITIES if q not in traces.columns]
long = traces.melt(id_vars=["arm", "seed", "step"], value_vars=present, var_name="quantity")
summary = (stats.summarize(long, ["arm", "quantity", "step"], "value")
           .rename(columns={"ci_half": "ci_half_width"}))
summary["step"] = summary["step"].astype(int)
arms = sorted(summary["arm"].astype(str).unique())
S = int(summary["step"].max())

TITLES = {("kl", "gt"): "KL to ground truth: −log p_i[M_g]",
          ("kl", "final"): "KL to final prediction: KL(p_T ‖ p_i)",
          ("top1", "gt"): "top-1 agreement with ground truth M_g",
          ("top1", "final"): "top-1 agreement with final prediction M̂_T"}
fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
for (kind, ref), ax in zip(TITLES, axes.ravel()):
    for arm in arms:
        for pos, style in (("all", "-"), ("masked", "--")):
            q = f"{kind}_{ref}_{pos}"
            d = summary[(summary["arm"] == arm) & (summary["quantity"] == q)].sort_values("step")
            if d.empty:
                continue
            ax.plot(d["step"], d["mean"], style, marker="o", ms=3, color=colors[arm],
                    label=f"{arm} · {'all positions' if pos == 'all' else 'still masked'}")
            if (d["n"] >= 2).any():
                # Drawn within the quantity's range (KL >= 0, top-1 in [0, 1]); the CSV keeps
                # the t-interval as computed (wide with few seeds).
                lo, hi = (0.0, None) if kind == "kl" else (0.0, 1.0)
                ax.fill_between(d["step"], d["ci_low"].clip(lo, hi), d["ci_high"].clip(lo, hi),
                                color=colors[arm], alpha=0.15, linewidth=0)
    ax.set_title(TITLES[(kind, ref)], fontsize=10)
    ax.set_xlabel("decode step i")
    ax.set_ylabel("KL (nats)" if kind == "kl" else "top-1 agreement (fraction)")
    ax.grid(alpha=0.3)
axes[0, 0].legend(fontsize=8)
fig.suptitle(f"Figure 4a — per-step prediction vs ground truth and final (S = {S}; "
             f"mean ± 95% CI over {len(trace_camp.seeds)} seed(s))", fontsize=11)
fig.tight_layout()
display(Image(filename=str(out.figure("figure4a", fig))))
plt.close(fig)

table_a = summary[["arm", "quantity", "step", "n", "mean", "ci_low", "ci_high"]]
wide = summary.assign(cell=[stats.format_ci(m, h, 3) for m, h in
                            zip(summary["mean"], summary["ci_half_width"])])
md_a = (wide.pivot_table(index=["arm", "step"], columns="quantity", values="cell",
                         aggfunc="first")[present].reset_index())
md_a.columns.name = None
md_a["step"] = md_a["step"].astype(str)
caption_a = ("Figure 4a values (mean ± 95% CI over seeds). kl_gt = −log p_i[M_g]; kl_final = "
             "KL(p_T‖p_i); top1_* = fraction of positions whose argmax equals M_g / M̂_T; "
             "*_masked = over the positions still masked before step i."
             + (f" Not logged: {', '.join(absent)}." if absent else ""))
display(Markdown(out.table("figure4a", table_a, caption_a, md=md_a)))

# %% [markdown]
# ## 4a, continued — the information revealed tokens give the decoder (paper §3.2)
#
# The paper's argument for multi-step decoding: predicting a token given the latent tokens *and*
# already-revealed tokens lowers the minimum loss by their conditional mutual information. Each
# evaluation that runs the trace also measures it (`sftok.evaluate.revealed`): on the held-out
# images, the decoder's cross-entropy on the ground-truth ids of the positions left masked when
# a fraction r of positions is revealed, with nothing revealed (`ce_none`), with the ground-truth
# ids revealed (`ce_gt`) and with its own step-1 argmax revealed (`ce_self`, what SFVR feeds it and
# what decoding at τ = 0 reveals). `info_gt = ce_none − ce_gt` estimates the information the
# true tokens give it, `info_self = ce_none − ce_self` what its own predictions give it (nats per
# masked token; `eval/reveal_<kind>_r<100·r>`).

# %%
reveal_long = []
for key in trace_camp.metric_keys(rr.eval_key("reveal_")):
    parsed = rr.parse_reveal_metric(rr.eval_name(key))
    if parsed:
        reveal_long.append(pd.DataFrame({"arm": trace_camp.runs["arm"],
                                         "seed": trace_camp.runs["seed"], "kind": parsed[0],
                                         "r": parsed[1], "value": trace_camp.column(key)}).dropna())
reveal = (stats.summarize(pd.concat(reveal_long, ignore_index=True), ["arm", "kind", "r"],
                          "value") if reveal_long else pd.DataFrame())
# The fraction of positions fixed before each decode step of the trace (its own schedule):
# what step i of an S-step decode can use.
fixed = (traces.groupby("step")["num_fixed"].mean().sort_index()
         if "num_fixed" in traces.columns else pd.Series(dtype=float))
revealed_before = (fixed.cumsum().shift(fill_value=0.0) / fixed.sum()) if len(fixed) else fixed
reveal_sentences = []
if reveal.empty:
    reveal_sentences.append("The revealed-token information was not logged by these trials "
                            "(evaluations before it existed, or eval.reveal_fractions=[]).")
    display(Markdown("No `eval/reveal_*` metrics in this campaign: "
                     + reveal_sentences[0]))
else:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in arms:
        for kind, style in (("info_gt", "-"), ("info_self", "--")):
            d = reveal[(reveal["arm"] == arm) & (reveal["kind"] == kind)].sort_values("r")
            if d.empty:
                continue
            axes[0].plot(d["r"], d["mean"], style, marker="o", ms=4, color=colors[arm],
                         label=f"{arm} · {'ground-truth ids' if kind == 'info_gt' else 'own step-1 ids'}")
            if (d["n"] >= 2).any():
                axes[0].fill_between(d["r"], d["ci_low"], d["ci_high"], color=colors[arm],
                                     alpha=0.15, linewidth=0)
        for kind, style in (("ce_none", ":"), ("ce_gt", "-"), ("ce_self", "--")):
            d = reveal[(reveal["arm"] == arm) & (reveal["kind"] == kind)].sort_values("r")
            if len(d):
                axes[1].plot(d["r"], d["mean"], style, marker="o", ms=3, color=colors[arm],
                             label=f"{arm} · {kind}")
    axes[0].axhline(0, color="k", lw=0.8)
    for step, frac in revealed_before.items():
        if 0 < frac < 1:
            axes[0].axvline(frac, color="grey", lw=0.6, ls=":")
            axes[0].annotate(f"i={step}", (frac, 1), xycoords=("data", "axes fraction"),
                             fontsize=7, ha="center", va="bottom")
    axes[0].set_xlabel("fraction r of positions revealed (dotted: revealed before step i)")
    axes[0].set_ylabel("information (nats per masked token)")
    axes[0].set_title("CE(nothing revealed) − CE(r revealed)", fontsize=10)
    axes[1].set_xlabel("fraction r of positions revealed")
    axes[1].set_ylabel("cross-entropy on the masked ids (nats)")
    axes[1].set_title("decoder CE on the positions left masked", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Information revealed tokens give the decoder (mean ± 95% CI over "
                 f"{len(trace_camp.seeds)} seed(s))", fontsize=11)
    fig.tight_layout()
    display(Image(filename=str(out.figure("figure4a_revealed", fig))))
    plt.close(fig)
    cells = reveal.assign(cell=[stats.format_ci(m, h, 4) for m, h in
                                zip(reveal["mean"], reveal["ci_half"])])
    md_r = cells.pivot_table(index=["arm", "r"], columns="kind", values="cell",
                             aggfunc="first").reset_index()
    md_r.columns.name = None
    display(Markdown(out.table(
        "figure4a_revealed", reveal[["arm", "kind", "r", "n", "mean", "ci_low", "ci_high"]],
        "Revealed-token information (nats per masked token, mean ± 95% CI over seeds): "
        "ce_* = the decoder's CE on the ground-truth ids of the positions left masked with "
        "nothing / the ground-truth ids / its own step-1 ids revealed at a fraction r; "
        "info_gt = ce_none − ce_gt, info_self = ce_none − ce_self.", md=md_r)))

    def rv(arm, kind, r):
        d = reveal[(reveal["arm"] == arm) & (reveal["kind"] == kind) & (reveal["r"] == r)]
        return d.iloc[0] if len(d) else None

    def clearly_positive(row) -> bool:
        return row is not None and row["n"] >= 2 and row["ci_low"] > 0

    r_mid = sorted(reveal["r"].unique())[len(reveal["r"].unique()) // 2]
    for arm in arms:
        gt_row, self_row, none_row = (rv(arm, k, r_mid) for k in ("info_gt", "info_self",
                                                                   "ce_none"))
        if gt_row is None or none_row is None:
            continue
        share = gt_row["mean"] / none_row["mean"] if none_row["mean"] else float("nan")
        text = (f"Revealing {r_mid:.0%} of the ground-truth ids lowers `{arm}`'s CE on the "
                f"rest by {stats.format_ci(gt_row['mean'], gt_row['ci_half'], 4)} nats per "
                f"token ({share:.1%} of its {none_row['mean']:.3f} nats with nothing revealed)")
        if self_row is not None:
            text += (f"; revealing its own step-1 ids changes it by "
                     f"{stats.format_ci(self_row['mean'], self_row['ci_half'], 4)}")
        reveal_sentences.append(text + ".")
        if not clearly_positive(gt_row):
            implied = ("the decoder uses almost nothing of what revealed tokens could tell "
                       "it, so decoding in more steps has nothing to act on: expect the step "
                       "sweep to stay flat")
        elif self_row is not None and not clearly_positive(self_row):
            implied = ("true tokens would help, but the ids that decoding at τ = 0 reveals are "
                       "its own predictions, which carry nothing about M_g beyond z and do not "
                       "help it: expect little gain from 1 to S steps (sampling, τ > 0, reveals "
                       "committed draws instead)")
        else:
            implied = ("its own revealed predictions help it too: the step sweep has something "
                       "to gain from 1 to S steps")
        reveal_sentences.append(f"For the step sweep (`{arm}`): {implied}.")

# %% [markdown]
# ## 4b — training loss with vs without warm-up

# %%
stages_of = dict(zip(train_camp.runs["run_id"], train_camp.trained_stages()))
hist = []
for stage in ("stage1", "stage2", "stage3"):
    h = train_camp.history(f"train/{stage}/{loss}")
    if len(h):
        hist.append(h.assign(stage=stage))
if not hist:
    raise md.RunsNotFound("ablation_sfvr_warmup", train_camp.tracking_uri,
                          f"the trials of parent run {train_camp.parent_id} logged no "
                          f"train/<stage>/{loss} history")
hist = pd.concat(hist, ignore_index=True)
hist["warmup"] = ["stage1" in stages_of[r] for r in hist["run_id"]]
curve = stats.summarize(hist, ["arm", "warmup", "stage", "step"], "value")
fig, ax = plt.subplots(figsize=(8, 4.5))
arms_b = sorted(curve["arm"].astype(str).unique())
colors_b = dict(zip(arms_b, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
for arm in arms_b:
    d = curve[curve["arm"] == arm].sort_values("step")
    warm = bool(d["warmup"].iloc[0])
    ax.plot(d["step"], d["mean"], "-" if warm else "--", color=colors_b[arm],
            label=f"{arm} ({'with' if warm else 'without'} warm-up)")
    if (d["n"] >= 2).any():
        ax.fill_between(d["step"], d["ci_low"], d["ci_high"], color=colors_b[arm], alpha=0.15,
                        linewidth=0)
    if warm and (d["stage"] == "stage2").any():
        ax.axvline(d.loc[d["stage"] == "stage2", "step"].min(), color=colors_b[arm], ls=":",
                   lw=1)
ax.set_xlabel("optimiser step (global, across stages)")
ax.set_ylabel(f"training loss train/<stage>/{loss}")
ax.set_title(f"Figure 4b — training loss with vs without warm-up (mean ± 95% CI over "
             f"{len(train_camp.seeds)} seed(s); dotted: start of SFVR after warm-up)", fontsize=10)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
display(Image(filename=str(out.figure("figure4b", fig))))
plt.close(fig)
table_b = curve[["arm", "warmup", "stage", "step", "n", "mean", "ci_low", "ci_high"]]
out.table("figure4b", table_b, f"Figure 4b curve: train/<stage>/{loss} per global step.",
          md=table_b.round(4))

# Final loss of each trial: mean over its last 10% of logged steps (smooths the logging noise).
from_end = hist.groupby("run_id")["step"].rank(ascending=False, method="first")
size = hist.groupby("run_id")["step"].transform("size")
last = (hist[from_end <= np.maximum(1, size // 10)]
        .groupby(["run_id", "arm", "seed", "warmup"], as_index=False)["value"].mean())
final = stats.summarize(last, ["arm", "warmup"], "value")
md_final = pd.DataFrame({
    "arm": final["arm"], "warm-up": ["✓" if w else "✗" for w in final["warmup"]],
    "seeds": final["n"].astype(str),
    f"final {loss} (mean ± 95% CI)": [stats.format_ci(m, h, 4) for m, h in
                                      zip(final["mean"], final["ci_half"])]})
display(Markdown(out.table("figure4b_final", final, f"Final training {loss} (mean of the last "
                           "10% of logged steps per trial).", md=md_final)))

# %% [markdown]
# ## Reading

# %%
def q(arm, name, step):
    d = summary[(summary["arm"] == arm) & (summary["quantity"] == name) & (summary["step"] == step)]
    return float(d["mean"].iloc[0]) if len(d) else float("nan")


sentences = [f"4a ({S} decode steps, {len(trace_camp.seeds)} seed(s)):"]
for arm in arms:
    kf = [q(arm, "kl_final_all", i) for i in range(1, S + 1)]
    tf = [q(arm, "top1_final_all", i) for i in range(1, S + 1)]
    mono = all(b <= a + 1e-9 for a, b in itertools.pairwise(kf))
    rise = all(b >= a - 1e-9 for a, b in itertools.pairwise(tf))
    sentences.append(
        f"for `{arm}`, KL(p_T‖p_i) over all positions goes from {kf[0]:.3g} at step 1 to "
        f"{kf[-2] if S > 1 else kf[0]:.3g} at step {max(S - 1, 1)} "
        f"({'monotonically falling' if mono else 'not monotonically'}), top-1 agreement with the "
        f"final prediction from {tf[0]:.1%} to {tf[-1]:.1%} ({'rising' if rise else 'not rising'} "
        f"throughout); at the last step the prediction still has KL {q(arm, 'kl_gt_all', S):.3g} "
        f"nats to the ground truth and agrees with it on "
        + ("an undetermined share (top1_gt_all not traced)" if np.isnan(q(arm, "top1_gt_all", S))
           else f"{q(arm, 'top1_gt_all', S):.1%}") + " of positions.")
final_top1 = [q(a, "top1_gt_all", S) for a in arms]
if any(np.isnan(v) for v in final_top1):  # not traced: the claim cannot be checked
    sentences.append(f"Whether the paper's claim — \"{paper_claim}\" — holds is undetermined: "
                     f"the traces have no top1_gt_all at step {S} for every arm.")
else:
    gap = all(v < 0.99 for v in final_top1)
    sentences.append(f"The paper's claim — \"{paper_claim}\" — is "
                     f"{'consistent with' if gap else 'not borne out by'} these traces.")
if len(arms) >= 2 and len(trace_camp.seeds) >= 1:
    final_gt = traces[traces["step"] == S]
    if "top1_gt_all" in final_gt:
        a, b = arms[0], arms[-1]
        pdiff = stats.paired_diff(final_gt, "arm", "seed", "top1_gt_all", a, b)
        ci = (f" [95% CI {pdiff.diff.low:+.3f}, {pdiff.diff.high:+.3f}]"
              if pdiff.diff.n >= 2 else "")
        sentences.append(f"Final-step top-1 agreement with the ground truth, `{b}` − `{a}`: "
                         f"{pdiff.diff.mean:+.3f}{ci} over {pdiff.diff.n} common seed(s).")
sentences += reveal_sentences
sentences.append(f"4b ({len(train_camp.seeds)} seed(s)): final training {loss} is "
                 + "; ".join(f"{r.arm} {'with' if r.warmup else 'without'} warm-up "
                             f"{stats.format_ci(r.mean, r.ci_half, 4)}"
                             for r in final.itertuples()) + ".")
warm = final[final["warmup"]]["arm"].tolist()
cold = [a for a in final[~final["warmup"]]["arm"] if "sfvr" in str(a).lower()] or \
    final[~final["warmup"]]["arm"].tolist()
if warm and cold:
    pdiff = stats.paired_diff(last, "arm", "seed", "value", cold[0], warm[0])
    sentences.append(
        f"With warm-up (`{warm[0]}`) minus without (`{cold[0]}`): {pdiff.diff.mean:+.4f}"
        + (f" [95% CI {pdiff.diff.low:+.4f}, {pdiff.diff.high:+.4f}], "
           f"{'excluding' if pdiff.excludes_zero else 'including'} 0" if pdiff.diff.n >= 2
           else " (one seed, no interval)")
        + ". Note that stage-1 loss is measured on fully masked inputs, so the curves are "
          "comparable only after the warm-up arm enters stage 2 (dotted line).")
reading = " ".join(sentences)
out.reading(reading)
display(Markdown(reading))
