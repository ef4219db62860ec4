"""MLflow -> pandas for the analysis notebooks, plus the small helpers they share for outputs.

The store's layout is `sftok.run_record` (the runner writes it from there too): one experiment
per spec; one *parent* run per invocation of `experiments/run.py`; one *child* run per trial
(tags `arm` and `seed`; params = the flattened resolved config, e.g.
`train.stage2.replace_ratio`). Metrics: `train/<stage>/<name>` (step = global optimiser step),
`eval/<metric>_s<S>` and S-independent `eval/<metric>`, `trace/<name>` (step = decode step i,
1..S). Artifacts: `config.json`, `grids/recon_s{S}.png`, `trace.csv`, `eval.json`.

    camp = load_campaign("ablation_replace_ratio", tracking_uri, parent="latest")
    camp.runs                      # one row per trial: run_id, arm, seed, params.*, metrics.*, tags.*
    camp.history("train/stage2/loss")   # long table: run_id, arm, seed, step, value
    camp.traces()                  # the per-step trace tables of every trial, stacked

A spec with no runs raises `RunsNotFound`, whose message says which spec to run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sftok import run_record as rr

# Artifact downloads (eval.json, trace.csv) would print a progress bar per file into notebooks,
# and tqdm.auto warns there that ipywidgets is missing; neither says anything about the data.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
warnings.filterwarnings("ignore", message="IProgress not found")
logging.getLogger("alembic").setLevel(logging.WARNING)  # SQLite schema messages at INFO

ANALYSIS_DIR = Path(__file__).resolve().parent
PAPER_RESULTS = ANALYSIS_DIR / "paper_results.yaml"

# Spec names (experiments/specs/<name>.yaml) and the results they feed.
SPECS = {
    "ablation_sfvr_warmup": "Table 3 + Figure 4b",
    "ablation_replace_ratio": "Table 4",
    "step_sweep": "Figure 8 (+ Figure 7's stage-2 model)",
    "per_step_trace": "Figure 4a",
    "reconstruction": "Table 1 + Figures 9-14",
    "generation": "Table 2",
    "generation_guidance_sweep": "Table 2 (guidance sweep)",
}

# Evaluation metrics: direction (True = higher is better) and a display label.
METRICS: dict[str, tuple[bool, str]] = {
    "rfid": (False, "rFID"),
    "is": (True, "IS"),
    "psnr": (True, "PSNR (dB)"),
    "ssim": (True, "SSIM"),
    "lpips": (False, "LPIPS"),
    "token_ce": (False, "token CE (step 1)"),
    "token_top1": (True, "token top-1 (step 1)"),
    "gfid": (False, "gFID"),
    "sample_codebook_usage": (True, "code usage (samples)"),
}
# When rFID is unavailable (no Inception weights offline) the tables fall back, in this order.
PROXY_ORDER = ("rfid", "lpips", "psnr", "ssim", "token_ce")
_STAGE = re.compile(r"stage\d")  # a tokenizer training stage (not generation)


class RunsNotFound(RuntimeError):
    """The store holds no (finished) runs of a spec. The message says which command to run."""

    def __init__(self, spec: str | Iterable[str], tracking_uri: str, detail: str = ""):
        specs = [spec] if isinstance(spec, str) else list(spec)
        self.specs = specs
        self.tracking_uri = tracking_uri
        lines = [f"no runs for spec {s} in store {tracking_uri} — run "
                 f"`python experiments/run.py {s}` first" for s in specs]
        if detail:
            lines.append(detail)
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Store access
# --------------------------------------------------------------------------------------------


def resolve_uri(tracking: str | os.PathLike | None = None) -> str:
    """A tracking URI as `experiments/run.py --tracking-uri` reads it: a URI is used as given,
    a plain directory is a store `DIR/mlflow.db` (+ `DIR/artifacts/`); None means
    `$MLFLOW_TRACKING_URI`, else the project's store `mlruns/` (`run_record.store_location`)."""
    return rr.store_location(tracking).uri


def client_for(tracking_uri: str | None = None):
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(tracking_uri)
    db = rr.sqlite_file(uri)
    if db is not None and not db.exists():
        # Opening a missing SQLite store would silently create an empty one.
        raise RunsNotFound([], uri, f"the store {uri} does not exist (no {db}); run "
                           "`python experiments/run.py <spec>` to create it, or pass "
                           "--tracking-uri")
    return MlflowClient(tracking_uri=uri), uri


def find_experiment(client, spec: str):
    """The experiment of `spec`: named after the spec, else any experiment tagged `spec=<spec>`."""
    exp = client.get_experiment_by_name(rr.experiment_name(spec))
    if exp is not None:
        return exp
    for e in client.search_experiments(filter_string=rr.spec_filter(spec)):
        return e
    return None


def is_parent(run) -> bool:
    return rr.is_parent(run.data.tags)


def find_parent(client, uri: str, spec: str, parent: str = "latest"):
    """The parent run: `parent` as a run id, or the latest parent run of the spec with children."""
    exp = find_experiment(client, spec)
    if parent and parent != "latest":
        try:
            run = client.get_run(parent)
        except Exception as e:  # noqa: BLE001 — MlflowException for unknown ids
            raise RunsNotFound(spec, uri, f"parent run {parent!r} not found: {e}") from None
        if exp is not None and run.info.experiment_id != exp.experiment_id:
            raise RunsNotFound(spec, uri, f"run {parent} belongs to another experiment "
                               f"(id {run.info.experiment_id}), not the one of spec {spec}")
        return exp or client.get_experiment(run.info.experiment_id), run
    if exp is None:
        raise RunsNotFound(spec, uri)
    runs = rr.search_all(client, [exp.experiment_id], order_by=rr.NEWEST_FIRST)
    children = {rr.parent_of(r.data.tags) for r in runs} - {None}
    parents = [r for r in runs if is_parent(r) and r.info.run_id in children]
    if not parents:
        raise RunsNotFound(spec, uri, f"experiment {spec!r} exists but has no parent run with "
                           "trials")
    return exp, parents[0]


def runs_frame(runs: list) -> pd.DataFrame:
    """One row per run: run_id, run_name, status, arm, seed, then params.*, metrics.*, tags.*."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "arm": r.data.tags.get(rr.ARM_TAG),
            "seed": rr.coerce_param(r.data.tags.get(rr.SEED_TAG, r.data.params.get("seed"))),
        }
        row.update({f"params.{k}": rr.coerce_param(v) for k, v in r.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["arm", "seed"], na_position="last", kind="stable")
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# A campaign: one parent run and its trials
# --------------------------------------------------------------------------------------------


@dataclass
class Campaign:
    spec: str
    tracking_uri: str
    experiment_id: str
    parent_run: Any  # mlflow.entities.Run
    runs: pd.DataFrame  # finished child runs, one row per trial
    failed: pd.DataFrame = field(default_factory=pd.DataFrame)  # children not FINISHED
    client: Any = None

    @property
    def parent_id(self) -> str:
        return self.parent_run.info.run_id

    @property
    def preset(self) -> str | None:
        return self.parent_run.data.tags.get(rr.PRESET_TAG)

    @property
    def seeds(self) -> list:
        return sorted(self.runs["seed"].dropna().unique().tolist())

    def describe(self) -> str:
        """One line naming the store, the parent run and what it contains."""
        t = self.parent_run.data.tags
        commit = t.get(rr.GIT_COMMIT_TAG)
        s = (f"spec `{self.spec}`, parent run `{self.parent_id}` (preset "
             f"`{self.preset or '?'}`{', commit ' + commit[:10] if commit else ''}), "
             f"{len(self.runs)} finished trials over {self.runs['arm'].nunique()} arms × "
             f"{len(self.seeds)} seeds")
        if len(self.failed):
            s += f"; {len(self.failed)} trials not finished (excluded)"
        return s

    def metric_keys(self, prefix: str = "") -> list[str]:
        cols = [c[len("metrics."):] for c in self.runs.columns if c.startswith("metrics.")]
        return sorted(c for c in cols if c.startswith(prefix))

    def column(self, name: str) -> pd.Series:
        """A metrics.* or params.* column by bare name; NaN when absent."""
        for c in (f"metrics.{name}", f"params.{name}", name):
            if c in self.runs.columns:
                return self.runs[c]
        return pd.Series([math.nan] * len(self.runs), index=self.runs.index, dtype=float)

    def trained_stages(self) -> pd.Series:
        """Per trial, the training stages it ran, e.g. ('stage1', 'stage2'): the runner's
        `stages` tag (or param), else the stages of its logged `train/<stage>/*` metrics."""
        out = []
        for _, row in self.runs.iterrows():
            raw = row.get(f"tags.{rr.STAGES_TAG}", row.get(f"params.{rr.STAGES_PARAM}"))
            st = _STAGE.findall(raw) if isinstance(raw, str) else []
            if not st:
                logged = [rr.parse_train_key(c.removeprefix("metrics.")) for c in row.index
                          if c.startswith("metrics.") and pd.notna(row[c])]
                st = sorted({p[0] for p in logged if p and _STAGE.fullmatch(p[0])})
            out.append(tuple(st))
        return pd.Series(out, index=self.runs.index, dtype=object)

    def history(self, key: str) -> pd.DataFrame:
        """Long table run_id, arm, seed, step, value of a metric's full history."""
        frames = []
        for _, r in self.runs.iterrows():
            hist = self.client.get_metric_history(r["run_id"], key)
            if hist:
                frames.append(pd.DataFrame({
                    "run_id": r["run_id"], "arm": r["arm"], "seed": r["seed"],
                    "step": [m.step for m in hist], "value": [m.value for m in hist]}))
        if not frames:
            return pd.DataFrame(columns=["run_id", "arm", "seed", "step", "value"])
        return pd.concat(frames, ignore_index=True).sort_values(["run_id", "step"]).reset_index(
            drop=True)

    def artifact_text(self, run_id: str, path: str) -> str | None:
        """Text of a run's artifact, or None when it is absent."""
        with tempfile.TemporaryDirectory() as d:
            try:
                local = self.client.download_artifacts(run_id, path, d)
            except Exception:  # noqa: BLE001 — absent artifact
                return None
            return Path(local).read_text()

    def eval_json(self, run_id: str) -> dict:
        text = self.artifact_text(run_id, rr.EVAL_JSON)
        return json.loads(text) if text else {}

    def unavailable(self) -> dict[str, str]:
        """metric -> why it is unavailable, merged over the trials' eval.json artifacts."""
        tags = {c[len("tags."):]: self.runs[c].dropna() for c in self.runs.columns
                if c.startswith("tags.")}
        tagged = rr.unavailable_from_tags(tags)  # the runner copies eval.json's into tags
        out = {m: str(vals.iloc[0]) for m, vals in tagged.items() if len(vals)}
        if not tagged:
            for rid in self.runs["run_id"]:
                out.update(self.eval_json(rid).get("unavailable", {}) or {})
        return out

    def why_missing(self, metric: str) -> str:
        """Why `eval/<metric>*` has no values: the evaluator's reason, else the config's."""
        why = self.unavailable().get(metric)
        if why:
            return why
        requested = " ".join(map(str, self.column("eval.metrics").dropna().unique()))
        if requested and metric not in requested:
            return f"not among the metrics these trials evaluate (eval.metrics = {requested})"
        return "not logged by these trials"

    def trace(self, run_id: str) -> pd.DataFrame:
        """The Figure-4a per-step trace of one trial: trace.csv, else the `trace/*` metrics."""
        text = self.artifact_text(run_id, rr.TRACE_CSV)
        if text:
            from io import StringIO

            return pd.read_csv(StringIO(text))
        columns = {k: c for k in self.client.get_run(run_id).data.metrics
                   if (c := rr.trace_column(k)) is not None}
        cols = {}
        for k, c in columns.items():
            for m in self.client.get_metric_history(run_id, k):
                cols.setdefault(m.step, {})[c] = m.value
        df = pd.DataFrame.from_dict(cols, orient="index").sort_index()
        return df.rename_axis("step").reset_index()

    def traces(self) -> pd.DataFrame:
        """All trials' traces stacked, with run_id, arm, seed columns."""
        frames = []
        for _, r in self.runs.iterrows():
            t = self.trace(r["run_id"])
            if len(t):
                frames.append(t.assign(run_id=r["run_id"], arm=r["arm"], seed=r["seed"]))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_campaign(spec: str, tracking_uri: str | None = None, parent: str = "latest") -> Campaign:
    """The trials of the latest (or a chosen) parent run of `spec`. Raises RunsNotFound."""
    client, uri = client_for(tracking_uri)
    if not client.search_experiments() and parent in (None, "latest"):
        raise RunsNotFound(spec, uri, "the store holds no experiments at all")
    _, prun = find_parent(client, uri, spec, parent or "latest")
    children = rr.search_all(client, [prun.info.experiment_id],
                             rr.children_filter(prun.info.run_id))
    df = runs_frame(children)
    if df.empty:
        raise RunsNotFound(spec, uri, f"parent run {prun.info.run_id} has no trials")
    done = df[df["status"] == "FINISHED"].reset_index(drop=True)
    failed = df[df["status"] != "FINISHED"].reset_index(drop=True)
    if done.empty:
        raise RunsNotFound(spec, uri, f"none of the {len(df)} trials of parent run "
                           f"{prun.info.run_id} has finished (statuses: "
                           f"{', '.join(sorted(set(df['status'])))})")
    return Campaign(spec=spec, tracking_uri=uri, experiment_id=prun.info.experiment_id,
                    parent_run=prun, runs=done, failed=failed, client=client)


def open_notebook(notebook: str, spec: str, tracking_uri: str | None = None,
                  parent: str = "latest", out_dir: str | os.PathLike | None = None
                  ) -> tuple[Campaign, Outputs]:
    """A single-spec notebook's set-up: the campaign it reads and its Outputs, with the
    campaign recorded in the manifest. Raises RunsNotFound (naming the spec to run)."""
    out = Outputs(notebook, out_dir)
    camp = load_campaign(spec, tracking_uri, parent)
    out.campaign(camp)
    return camp, out


def load_campaigns(specs: dict[str, str], tracking_uri: str | None = None) -> dict[str, Campaign]:
    """{spec: parent} -> {spec: Campaign}; one RunsNotFound naming every missing spec."""
    out, missing, details, uri = {}, [], [], resolve_uri(tracking_uri)
    for spec, parent in specs.items():
        try:
            out[spec] = load_campaign(spec, tracking_uri, parent)
        except RunsNotFound as e:
            missing.append(spec)
            details.extend(line for line in str(e).splitlines() if not line.startswith("no runs"))
            uri = e.tracking_uri
    if missing:
        raise RunsNotFound(missing, uri, "\n".join(dict.fromkeys(details)))
    return out


# --------------------------------------------------------------------------------------------
# Evaluation metrics
# --------------------------------------------------------------------------------------------


def eval_key(metric: str, steps: int | None = None) -> str:
    """`eval/<metric>_s<S>`, or `eval/<metric>` without S."""
    return rr.eval_key(rr.step_metric(metric, steps) if steps is not None else metric)


def eval_steps(camp: Campaign, metric: str | None = None) -> list[int]:
    """Decode-step counts S that appear in `eval/<metric>_s<S>` keys (any metric if None)."""
    found = set()
    for k in camp.metric_keys(rr.EVAL):
        parsed = rr.parse_step_metric(rr.eval_name(k))
        if parsed and (metric is None or parsed[0] == metric) and camp.column(k).notna().any():
            found.add(parsed[1])
    return sorted(found)


def has_metric(camp: Campaign, key: str) -> bool:
    s = camp.column(key)
    return bool(s.notna().any()) and bool(pd.to_numeric(s, errors="coerce").notna().any())


def choose_steps(camp: Campaign, preferred: int = 8) -> int | None:
    """The paper's S=8 when evaluated, else the largest S evaluated."""
    steps = eval_steps(camp)
    if not steps:
        return None
    return preferred if preferred in steps else max(steps)


def choose_metric(camp: Campaign, steps: int | None, order: Iterable[str] = PROXY_ORDER
                  ) -> tuple[str, str]:
    """(metric, mlflow key) of the first metric in `order` that the campaign has values for."""
    for m in order:
        for key in ([eval_key(m, steps)] if steps is not None else []) + [eval_key(m)]:
            if has_metric(camp, key):
                return m, key
    raise RunsNotFound(camp.spec, camp.tracking_uri,
                       f"the trials of parent run {camp.parent_id} logged none of the metrics "
                       f"{', '.join(order)} (looked for eval/<metric>_s{steps})")


def fmt_num(x: Any) -> str:
    """A number for a Markdown cell: 1.0 stays '1.0', 0.25 stays '0.25'; '—' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and x == int(x):
        return f"{x:.1f}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def metric_label(metric: str) -> str:
    return METRICS.get(metric, (None, metric))[1]


def higher_is_better(metric: str) -> bool:
    return METRICS.get(metric, (False, metric))[0]


# --------------------------------------------------------------------------------------------
# Floor and ceiling (sftok.evaluate.bounds): eval/<prefix>_<metric>, the same in every trial
# that shares data and teacher
# --------------------------------------------------------------------------------------------

BOUNDS = {
    rr.FLOOR_TOKENIZER: "floor: naive codec with the tokenizer's bits (K px, Q colours)",
    rr.FLOOR_TEACHER: "floor: naive codec with the teacher's bits (N px, V colours)",
    rr.CEILING_PREFIX: "ceiling: the teacher from its own codes",
}


def bound_values(camp: Campaign, metric: str) -> dict[str, float]:
    """prefix -> mean over trials of eval/<prefix>_<metric>, for the bounds that were logged."""
    out = {}
    for prefix in BOUNDS:
        vals = pd.to_numeric(camp.column(rr.eval_key(rr.bound_metric(prefix, metric))),
                             errors="coerce").dropna()
        if len(vals):
            out[prefix] = float(vals.mean())
    return out


def with_bounds(md_table: pd.DataFrame, camp: Campaign, metric: str, value_col: str
                ) -> pd.DataFrame:
    """`md_table` plus one row per logged bound: its label in the first column, its value in
    `value_col`, '—' elsewhere (a Markdown table of the arms with their floor and ceiling)."""
    values = bound_values(camp, metric)
    if not values:
        return md_table
    first = md_table.columns[0]
    extra = [{c: (BOUNDS[p] if c == first else f"{v:.3f}" if c == value_col else "—")
              for c in md_table.columns} for p, v in values.items()]
    return pd.concat([md_table, pd.DataFrame(extra)], ignore_index=True)


def bounds_reading(camp: Campaign, metric: str, arm_means: dict[Any, float],
                   fmt=fmt_num) -> str:
    """Where the arms stand between the tokenizer's floor (0%) and the teacher ceiling (100%)."""
    values = bound_values(camp, metric)
    label = metric_label(metric)
    floor, ceiling = values.get(rr.FLOOR_TOKENIZER), values.get(rr.CEILING_PREFIX)
    if floor is None or ceiling is None:
        logged = bool(camp.metric_keys(rr.eval_key(rr.bound_metric(rr.CEILING_PREFIX, ""))))
        return (f"No floor/ceiling of {label} was logged ("
                + ("they exist for reconstruction metrics only" if logged else
                   "trials evaluated before floors and ceilings existed")
                + "), so the arms cannot be placed between a naive codec and the teacher.")
    hib = higher_is_better(metric)
    gap = (ceiling - floor) if hib else (floor - ceiling)
    text = (f"On {label}, a naive codec with the tokenizer's bits scores {floor:.3g} (the floor) "
            f"and the teacher reconstructing from its own codes {ceiling:.3g} (the ceiling)")
    if rr.FLOOR_TEACHER in values:
        text += f"; a naive codec with the teacher's bits scores {values[rr.FLOOR_TEACHER]:.3g}"
    means = {arm: v for arm, v in arm_means.items()
             if v is not None and not (isinstance(v, float) and math.isnan(v))}
    # What an arm below the floor can and cannot say: its paired differences to other arms are
    # still measured effects of training, but of a tokenizer no better than a thumbnail.
    caveat = ("their differences compare training methods on an under-trained tokenizer (read the "
              "paired intervals), not codecs worth using")
    if gap <= 0:
        stand = ""
        if means:
            dist = [(ceiling - v) if hib else (v - ceiling) for v in means.values()]
            lo, hi = f"{min(dist):.3g}", f"{max(dist):.3g}"
            stand = (f"; the arms stand {lo if lo == hi else f'{lo} to {hi}'} "
                     f"{'below' if hib else 'above'} the ceiling")
        return (text + ". The ceiling is not above the floor: through this teacher no tokenizer "
                f"can beat a thumbnail with its bits{stand}, so {caveat}.")
    pos = {arm: ((v - floor) if hib else (floor - v)) / gap for arm, v in means.items()}
    if not pos:
        return text + "."
    below = [arm for arm, p in pos.items() if p < 0]
    return (text + ". Measured from floor (0%) to ceiling (100%), the arms stand at "
            + ", ".join(f"{fmt(arm)} at {p:.0%}" for arm, p in pos.items()) + (
                f"; {len(below)} of {len(pos)} arm(s) are below the floor (worse than a "
                f"thumbnail with the same bits), so {caveat}" if below else "") + ".")


def unavailable_note(camp: Campaign, metric: str, chosen: str) -> str:
    """Caption sentence when `chosen` stands in for `metric` (e.g. rFID offline)."""
    if chosen == metric:
        return ""
    why = camp.why_missing(metric)
    return (f"{metric_label(metric)} is unavailable ({why.rstrip('.')}); "
            f"{metric_label(chosen)} is reported as a proxy "
            f"({'higher' if higher_is_better(chosen) else 'lower'} is better), so our numbers "
            f"are not on the paper's scale.")


# --------------------------------------------------------------------------------------------
# Paper numbers and outputs
# --------------------------------------------------------------------------------------------


def paper_results() -> dict:
    import yaml

    return yaml.safe_load(PAPER_RESULTS.read_text())


def out_dir_for(name: str, out_dir: str | os.PathLike | None) -> Path:
    d = Path(out_dir) if out_dir else ANALYSIS_DIR / "out" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


class Outputs:
    """Collects a notebook's tables, figures and reading; writes `manifest.json` for render.py.

    Tables: `<name>.csv` + `<name>.md`. Figures: `<name>.png` + `<name>.axes.json` (title and
    axis labels of every axes, line labels) so tests can check them without parsing images.
    """

    def __init__(self, notebook: str, out_dir: str | os.PathLike | None):
        self.notebook = notebook
        self.dir = out_dir_for(notebook, out_dir)
        self.manifest: dict[str, Any] = {"notebook": notebook, "campaigns": {}, "tables": [],
                                         "figures": [], "reading": ""}

    def campaign(self, camp: Campaign) -> None:
        self.manifest["campaigns"][camp.spec] = {
            "parent_run_id": camp.parent_id, "experiment_id": camp.experiment_id,
            "tracking_uri": camp.tracking_uri, "trials": len(camp.runs),
            "seeds": [int(s) if isinstance(s, (int, float)) and not math.isnan(s) else s
                      for s in camp.seeds]}
        self._write()

    def table(self, name: str, df: pd.DataFrame, caption: str = "",
              md: pd.DataFrame | None = None) -> str:
        """CSV of `df` (numbers) and Markdown of `md` (formatted; defaults to `df`) + caption."""
        df.to_csv(self.dir / f"{name}.csv", index=False)
        md = (df if md is None else md).to_markdown(index=False, disable_numparse=True)
        text = md + (f"\n\n{caption}\n" if caption else "\n")
        (self.dir / f"{name}.md").write_text(text)
        self.manifest["tables"].append({"name": name, "csv": f"{name}.csv", "md": f"{name}.md",
                                        "rows": len(df), "columns": list(map(str, df.columns))})
        self._write()
        return text

    def figure(self, name: str, fig) -> Path:
        path = self.dir / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        axes = []
        for ax in fig.get_axes():
            if not ax.get_visible() or not ax.has_data():
                continue
            axes.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(),
                         "ylabel": ax.get_ylabel(),
                         "lines": [ln.get_label() for ln in ax.get_lines()
                                   if not ln.get_label().startswith("_")]})
        (self.dir / f"{name}.axes.json").write_text(json.dumps({"axes": axes}, indent=1))
        self.manifest["figures"].append({"name": name, "png": f"{name}.png",
                                         "axes": f"{name}.axes.json"})
        self._write()
        return path

    def reading(self, text: str) -> str:
        self.manifest["reading"] = text
        (self.dir / "reading.md").write_text(text + "\n")
        self._write()
        return text

    def _write(self) -> None:
        (self.dir / "manifest.json").write_text(json.dumps(self.manifest, indent=1))
