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
# # Table 5 — training compute (GPU-hours per stage)
#
# Paper (arXiv 2512.16910, Table 5; 8× RTX 4090): SFTok-B 1224 GPU-hours for stages 1+2 and
# 1656 for stage 3; SFTok-L 1728 and 3264. Here: the training-step throughput that
# `scripts/benchmark.py` measures on the machine at hand (the real training step of each stage
# on random images, stage 3 with the GAN on), projected to the paper's budget — the images the
# paper's stages see (Table 6: stage 1 200k + stage 2 800k steps of 256 images, stage 3 1M
# steps of 128) divided by the measured images/s, on one device. For `sftok-b` / `sftok-l`
# measured on a GPU this is the paper's model at the paper's batch; for small presets it says
# what this machine would spend per image at their size, not at the paper's.
#
# Input: `benchmark_json`, a throughput record (`sftok.train.benchmark.throughput_record`):
# the file `python scripts/benchmark.py --train-presets sftok-b sftok-l --json FILE` writes,
# or the `report.json` of a device check (`scripts/device_check.py --out DIR`, on the GPU
# machine; its eager and torch.compile rows: the faster of the two per stage is used, and the
# table says which). Without it, the presets in `measure_presets` are measured here, now.
# Rendered by `python analysis/render.py table5_compute -p benchmark_json=FILE`.

# %% tags=["parameters"]
tracking_uri = None  # unused (this notebook reads no MLflow run); accepted from render.py
parent = "latest"  # unused
out_dir = None  # None: analysis/out/table5_compute
benchmark_json = None  # `scripts/benchmark.py --json` file or a device check's report.json
measure_presets = ["smoke"]  # measured when benchmark_json is None (e.g. ["tiny"] on a CPU)
train_steps = 2  # timed steps per stage when measuring here

# %%
import os
import sys

sys.path[:0] = [p for p in (os.path.abspath("."), os.path.abspath("analysis"))
                if os.path.exists(os.path.join(p, "mlflow_data.py"))]
sys.path.append(os.path.dirname(sys.path[0]))  # the repository root, for `sftok`

import mlflow_data as md
import pandas as pd
from IPython.display import Markdown, display

out = md.Outputs("table5_compute", out_dir)
paper = md.paper_results()
paper_cfg = paper["training_config_sftok_b"]
gpus = paper_cfg["batch"]["gpus"]
# Images per optimiser step and steps per stage in the paper (Table 6).
s3 = paper_cfg["stage3"]
PAPER_IMAGES = {
    "stage1": paper_cfg["steps"]["stage1"] * paper_cfg["batch"]["per_gpu"] * gpus,
    "stage2": paper_cfg["steps"]["stage2"] * paper_cfg["batch"]["per_gpu"] * gpus,
    "stage3": paper_cfg["steps"]["stage3"] * s3["per_gpu_batch"] * gpus * s3["grad_accum"],
}

if benchmark_json:
    from sftok.train.benchmark import read_throughput

    record = read_throughput(benchmark_json)
    rows, device_name, source = record["rows"], record.get("device_name", "?"), benchmark_json
else:
    import torch

    from sftok.presets import get_preset
    from sftok.train.benchmark import benchmark_training

    torch.manual_seed(0)
    rows = []
    for name in measure_presets:
        rows += benchmark_training(get_preset(name), steps=train_steps, warmup=1)
    device_name = rows[0]["device"] if rows else "?"
    source = f"measured here ({', '.join(measure_presets)}, {train_steps} steps per stage)"
bench = pd.DataFrame(rows)
if "mode" not in bench:  # files written before torch.compile rows existed: all eager
    bench["mode"] = "eager"
display(Markdown(f"Throughput source: {source}; device: {device_name}."))
display(bench)
# One row per preset and stage: the fastest measured mode (eager or torch.compile).
bench = (bench.sort_values("images_per_s", ascending=False)
         .drop_duplicates(["preset", "stage"]).sort_index())

# %% [markdown]
# ## Projected GPU-hours beside the paper's

# %%
def own_steps(preset: str, stage: str) -> int | None:
    from sftok.presets import PRESETS, get_preset

    if preset not in PRESETS:
        return None
    return getattr(get_preset(preset).train, stage).steps


table_rows = []
for preset, g in bench[bench["stage"].isin(["stage1", "stage2", "stage3"])].groupby("preset"):
    ips = dict(zip(g["stage"], g["images_per_s"]))
    sps = dict(zip(g["stage"], g["s_per_step"]))
    for group, stages in (("stage1+2", ("stage1", "stage2")), ("stage3", ("stage3",))):
        if not all(s in ips for s in stages):
            continue
        hours = sum(PAPER_IMAGES[s] / ips[s] for s in stages) / 3600
        own = [own_steps(preset, s) for s in stages]
        own_h = (sum(n * sps[s] for n, s in zip(own, stages)) / 3600
                 if all(n is not None for n in own) else None)
        modes = ", ".join(sorted(set(g[g["stage"].isin(stages)]["mode"])))
        table_rows.append({"source": "ours (projected)", "model": preset, "stages": group,
                           "device": g["device"].iloc[0], "mode": modes,
                           "images_per_s": sum(ips[s] for s in stages) / len(stages),
                           "gpu_hours_paper_budget": hours,
                           "hours_preset_budget": own_h, "paper_gpu_hours": None})
for model, comp in paper["compute"].items():
    for group, key in (("stage1+2", "stage12"), ("stage3", "stage3")):
        table_rows.append({"source": "paper (8× RTX 4090)", "model": model, "stages": group,
                           "device": "RTX 4090", "mode": "—", "images_per_s": None,
                           "gpu_hours_paper_budget": None, "hours_preset_budget": None,
                           "paper_gpu_hours": comp[key]})
table = pd.DataFrame(table_rows)
# Paper rows: the preset that is the paper's model gets its number beside the projection.
paper_of = {"sftok-b": "SFTok-B", "sftok-l": "SFTok-L"}
for i, r in table.iterrows():
    if r["source"].startswith("ours") and r["model"] in paper_of:
        key = "stage12" if r["stages"] == "stage1+2" else "stage3"
        table.loc[i, "paper_gpu_hours"] = paper["compute"][paper_of[r["model"]]][key]
md_table = table.assign(**{
    "images/s": [md.fmt_num(round(v, 1)) if pd.notna(v) else "—"
                 for v in table["images_per_s"]],
    "GPU-h (paper budget)": [f"{v:,.0f}" if pd.notna(v) else "—"
                             for v in table["gpu_hours_paper_budget"]],
    "h (preset budget)": [f"{v:.2f}" if pd.notna(v) else "—"
                          for v in table["hours_preset_budget"]],
    "paper GPU-h": [f"{v:,.0f}" if pd.notna(v) else "—"
                    for v in table["paper_gpu_hours"]]})[
    ["source", "model", "stages", "device", "mode", "images/s", "GPU-h (paper budget)",
     "h (preset budget)", "paper GPU-h"]]
caption = ("Projected = the paper's images per stage (Table 6) / measured images/s, one device; "
           "'preset budget' = the preset's own steps × measured s/step; mode = eager or the "
           "torch.compile backend, whichever measured faster. Paper: Table 5.")
display(Markdown(out.table("table5", table, caption, md=md_table)))

# %% [markdown]
# ## Reading

# %%
ours = table[table["source"].str.startswith("ours")]
parts = []
for r in ours.itertuples():
    s = (f"`{r.model}` on {r.device}: {r.gpu_hours_paper_budget:,.0f} GPU-hours for "
         f"{r.stages} at the paper's budget")
    if pd.notna(r.paper_gpu_hours):
        s += (f" (paper: {r.paper_gpu_hours:,.0f} on RTX 4090, ratio "
              f"{r.gpu_hours_paper_budget / r.paper_gpu_hours:.2f})")
    parts.append(s)
reading = ("; ".join(parts) + ". " if parts else "No stage throughput was measured. ")
if not set(ours["model"]) & set(paper_of):
    reading += ("No paper-scale preset was measured, so these projections are for smaller models "
                "and do not compare with the paper's hours; run `python scripts/benchmark.py "
                "--train-presets sftok-b sftok-l --json FILE` (or `scripts/device_check.py "
                "--out DIR`) on a GPU and render with `-p benchmark_json=FILE` (or "
                "DIR/report.json).")
out.reading(reading)
display(Markdown(reading))
