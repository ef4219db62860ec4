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
# # Table 1 — reconstruction quality
#
# Paper (arXiv 2512.16910, Table 1; ImageNet 256×256 validation, 8 decode steps): rFID of SFTok
# (1.44 for B, 1.21 for L, 64 tokens) against other tokenizers. Here: rFID, IS, PSNR, SSIM and
# LPIPS at 8 decode steps of the trials of the latest (or a chosen) parent run of the spec
# `reconstruction`, beside the paper's rows. Our numbers come from the run's preset (data,
# resolution, model size), so they are on the paper's scale only for `sftok-b`/`sftok-l` on
# ImageNet. Rendered by `python analysis/render.py table1_reconstruction`.

# %% tags=["parameters"]
tracking_uri = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
parent = "latest"  # parent run id of a `reconstruction` invocation, or "latest"
out_dir = None  # None: analysis/out/table1_reconstruction
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

SPEC = "reconstruction"
METRICS = ["rfid", "is", "psnr", "ssim", "lpips"]
camp, out = md.open_notebook("table1_reconstruction", SPEC, tracking_uri, parent, out_dir)
display(Markdown(camp.describe()))

# %% [markdown]
# ## Our tokenizer(s) beside the paper's table

# %%
S = md.choose_steps(camp, steps)
present = [m for m in METRICS if md.has_metric(camp, md.eval_key(m, S))]
missing = [m for m in METRICS if m not in present]
if not present:
    raise md.RunsNotFound(SPEC, camp.tracking_uri, f"the trials of parent run {camp.parent_id} "
                          f"logged none of eval/{{{','.join(METRICS)}}}_s{S}")
runs = camp.runs.assign(
    tokens=camp.column("tokenizer.num_latent_tokens"),
    codebook=camp.column("tokenizer.quantizer.codebook_size"))
paper = md.paper_results()["table1_reconstruction"]

rows, md_rows, ivs = [], [], {}
for arm, g in runs.groupby("arm", sort=True):
    row = {"model": f"ours · {arm}", "source": f"ours ({camp.preset or '?'} preset)",
           "tokens": g["tokens"].iloc[0], "codebook": g["codebook"].iloc[0], "steps": S,
           "n_seeds": int(g["seed"].nunique())}
    mrow = {"model": f"ours · {arm}", "source": row["source"], "tokens": md.fmt_num(row["tokens"]),
            "codebook": md.fmt_num(row["codebook"]), "seeds": str(row["n_seeds"])}
    for m in METRICS:
        key = md.eval_key(m, S)
        iv = stats.mean_ci(pd.to_numeric(g[f"metrics.{key}"]) if f"metrics.{key}" in g else [])
        ivs[(arm, m)] = iv
        row.update({f"{m}_mean": iv.mean, f"{m}_ci_low": iv.low, f"{m}_ci_high": iv.high})
        mrow[md.metric_label(m)] = iv.fmt(3) if iv.n else "n/a"
    rows.append(row)
    md_rows.append(mrow)
for name, p in paper.items():
    rows.append({"model": name, "source": "paper", "tokens": p["tokens"], "codebook": p["codebook"],
                 "steps": 8 if name.startswith("SFTok") else None, "n_seeds": None,
                 "rfid_mean": p["rfid"]})
    md_rows.append({"model": name, "source": "paper", "tokens": str(p["tokens"]),
                    "codebook": str(p["codebook"]), "seeds": "—",
                    **{md.metric_label(m): (f"{p['rfid']:.2f}" if m == "rfid" else "—")
                       for m in METRICS}})
# The naive-codec floors and the teacher ceiling of the same images (sftok.evaluate.bounds).
for prefix, what in md.BOUNDS.items():
    vals = {m: md.bound_values(camp, m).get(prefix) for m in METRICS}
    if all(v is None for v in vals.values()):
        continue
    rows.append({"model": what, "source": "ours (same images)", "steps": None,
                 **{f"{m}_mean": v for m, v in vals.items()}})
    md_rows.append({"model": what, "source": "ours (same images)", "tokens": "—",
                    "codebook": "—", "seeds": "—",
                    **{md.metric_label(m): "—" if v is None else f"{v:.3f}"
                       for m, v in vals.items()}})
table = pd.DataFrame(rows)
md_table = pd.DataFrame(md_rows)
notes = [(f"Table 1 — reconstruction at {S} decode steps ({camp.describe()}); ours: mean ± 95% "
          "CI over seeds (one seed: the value alone).")]
if missing:
    notes.append("Unavailable here (n/a): " + "; ".join(
        f"{md.metric_label(m)} — {camp.why_missing(m)}" for m in missing)
        + ".")
if "rfid" not in present:
    proxy = next((m for m in md.PROXY_ORDER[1:] if m in present), None)
    if proxy:
        notes.append(f"rFID, the paper's only metric here, is missing, so our row cannot be "
                     f"compared with the paper's on it; {md.metric_label(proxy)} is the stated "
                     f"proxy for reconstruction quality.")
display(Markdown(out.table("table1", table, " ".join(notes), md=md_table)))

# %% [markdown]
# ## Reading

# %%
sftok_b = paper["SFTok-B"]["rfid"]
sentences = []
for arm in sorted(runs["arm"].unique()):
    iv = ivs[(arm, "rfid")]
    tok = runs[runs["arm"] == arm]["tokens"].iloc[0]
    head = f"`{arm}` ({md.fmt_num(tok)} tokens, {camp.preset or '?'} preset, {iv.n or len(camp.seeds)} seed(s))"
    if iv.n:
        rank = sorted([p["rfid"] for p in paper.values()] + [iv.mean]).index(iv.mean) + 1
        sentences.append(f"{head} reaches rFID {iv.fmt(2)} at {S} steps against SFTok-B's "
                         f"{sftok_b:.2f}, which would place it {rank} of {len(paper) + 1} "
                         f"in the paper's table"
                         + ("" if camp.preset in ("sftok-b", "sftok-l") else
                            " — but this preset is not the paper's setting (data, resolution and "
                            "model size differ), so the comparison is indicative only") + ".")
    else:
        others = ", ".join(f"{md.metric_label(m)} {ivs[(arm, m)].fmt(3)}" for m in present)
        sentences.append(f"{head}: rFID is unavailable ({camp.why_missing('rfid')}), so it "
                         f"cannot be set against the paper's SFTok-B {sftok_b:.2f}; measured: "
                         f"{others}.")
placed = next((m for m in md.PROXY_ORDER if m in present), None)
if placed is not None:
    sentences.append(md.bounds_reading(
        camp, placed, {arm: ivs[(arm, placed)].mean for arm in sorted(runs["arm"].unique())},
        fmt=lambda a: f"`{a}`"))
reading = " ".join(sentences)
out.reading(reading)
display(Markdown(reading))
