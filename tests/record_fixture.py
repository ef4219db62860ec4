"""The MLflow run record a smoke campaign writes, as plain data, for the layout test.

`campaign_record(client, spec)` reads back, from a store, everything about the run record a
notebook or a user could depend on: the experiment's tags; for the parent run and each child
run (by trial key) the tag keys with the values that are not run-specific, the metric keys with
their steps, the param keys, the artifact paths and the top-level keys of the JSON / CSV
artifacts. `tests/fixtures/run_record.json` holds that record as the code before issue 18 wrote
it, plus the experiment's comparison view of issue 21 (a tag naming the parent run, whose id
reads `<parent>` there). `python tests/record_fixture.py --write` runs the two smoke campaigns
and rewrites it: do that only for an intended change of the run record,
`sftok/run_record.py`, and say so in the commit. `differences(client, spec)` lists how a
store's record departs from the fixture.

It spells no layout name of its own (no role tag, no metric prefix): the fixture holds them, so
the test compares the strings the runner writes with the recorded ones. A run is a child when it
names another run of the experiment as its parent through any tag.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
import tempfile
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "run_record.json"
ROOT = Path(__file__).resolve().parent.parent

# The smoke campaigns the record is made from (what test_runner / test_generation_campaign run).
CAMPAIGNS = {
    "ablation_replace_ratio": ["ablation_replace_ratio", "--preset", "smoke", "--seeds", "1"],
    "generation_guidance_sweep": ["generation_guidance_sweep", "--preset", "smoke", "--seeds",
                                  "1"],
}

# Tag values that differ between two runs of the same campaign (ids, times, paths, hosts,
# content hashes of code or config; which of the trials sharing a stage result trained it):
# recorded as None, their keys are still compared.
VOLATILE_TAGS = re.compile(
    r"^(mlflow\.(?!experimentKind$).*|git_commit|git_dirty|command(\..*)?|spec_file|wall_s|"
    r"sftok\.campaign(_dir)?|teacher\.\d+|ray_trial_id|placement\..*|stage\..*\.(key|source)|"
    r"eval_unavailable\..*)$")
# Metrics and tags that exist only where optional pretrained weights are (Inception, LPIPS):
# compared only when the environment has the same ones unavailable as the recorded one.
WEIGHTS_DEPENDENT = re.compile(
    r"^(eval/(.*_)?(rfid|is|lpips|gfid|calib_(fid|is)_\w+)(_s\d+)?|eval/sweep/.*/(gfid|is)|"
    r"eval_unavailable\..*)$")


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return sorted(out)


def _file_keys(client, run_id: str, path: str) -> list[str]:
    """Top-level keys of a JSON artifact, or the header of a CSV one."""
    with tempfile.TemporaryDirectory() as d:
        text = Path(client.download_artifacts(run_id, path, d)).read_text()
    if path.endswith(".csv"):
        return next(csv.reader(io.StringIO(text)))
    doc = json.loads(text)
    return sorted(doc) if isinstance(doc, dict) else [type(doc).__name__]


def _normalise_path(path: str) -> str:
    """Artifact paths that embed a content hash (teacher/<key>.json) -> a stable form."""
    return re.sub(r"^teacher/[^/]+\.json$", "teacher/<key>.json", path)


def run_record(client, run) -> dict:
    tags = {k: (None if VOLATILE_TAGS.match(k) else v) for k, v in sorted(run.data.tags.items())}
    metrics = {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k))
               for k in sorted(run.data.metrics)}
    arts = _artifacts(client, run.info.run_id)
    files = {p: _file_keys(client, run.info.run_id, p) for p in arts
             if "/" not in p and p.endswith((".json", ".csv"))}
    return {"status": run.info.status, "tags": tags, "metrics": metrics,
            "params": sorted(run.data.params),
            "artifacts": sorted({_normalise_path(p) for p in arts}), "files": files}


def experiment_tags(tags: dict, parent_id: str, run_ids: set[str]) -> dict:
    """The experiment's tags as they concern the campaign of `parent_id`: a tag naming (in its
    key or value) another run of the experiment is another campaign's and left out; the
    parent's id in a key or value reads `<parent>`."""
    out = {}
    for k, v in sorted(tags.items()):
        if any(i in k or i in v for i in run_ids - {parent_id}):
            continue
        out[k.replace(parent_id, "<parent>")] = v.replace(parent_id, "<parent>")
    return out


def campaign_record(client, spec: str) -> dict:
    """The record of the latest parent run of experiment `spec` and of its children."""
    exp = client.get_experiment_by_name(spec)
    runs = client.search_runs([exp.experiment_id], max_results=1000,
                              order_by=["attributes.start_time DESC"])
    ids = {r.info.run_id for r in runs}
    parent_of = {r.info.run_id: next((v for v in r.data.tags.values() if v in ids), None)
                 for r in runs}
    parents = [r for r in runs if parent_of[r.info.run_id] is None]
    parent = parents[0]  # the latest
    children = [r for r in runs if parent_of[r.info.run_id] == parent.info.run_id]
    # A child's key: its run name (the trial key the runner names it by).
    return {"experiment": {"tags": experiment_tags(exp.tags, parent.info.run_id, ids)},
            "parent": run_record(client, parent),
            "children": {r.info.run_name: run_record(client, r)
                         for r in sorted(children, key=lambda r: r.info.run_name)}}


def unavailable(record: dict) -> set[str]:
    """The weights-dependent tag keys of a campaign record (which metrics were unavailable)."""
    runs = [record["parent"], *record["children"].values()]
    return {k for r in runs for k in r["tags"] if WEIGHTS_DEPENDENT.match(k)}


def comparable(record: dict, drop_weights_dependent: bool) -> dict:
    """The record without the entries that depend on optional weights (when asked to)."""
    if not drop_weights_dependent:
        return record

    def strip(r: dict) -> dict:
        return {**r, "tags": {k: v for k, v in r["tags"].items() if not WEIGHTS_DEPENDENT.match(k)},
                "metrics": {k: v for k, v in r["metrics"].items()
                            if not WEIGHTS_DEPENDENT.match(k)}}

    return {**record, "parent": strip(record["parent"]),
            "children": {k: strip(v) for k, v in record["children"].items()}}


def load_fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _compare(where: str, got: dict, want: dict) -> list[str]:
    """One line per key of a run record that is missing, extra or different."""
    out = []
    for part in sorted(set(got) | set(want)):
        g, w = got.get(part), want.get(part)
        if g == w:
            continue
        if isinstance(g, dict) and isinstance(w, dict):
            missing, extra = sorted(set(w) - set(g)), sorted(set(g) - set(w))
            changed = sorted(k for k in set(g) & set(w) if g[k] != w[k])
            out.append(f"{where} {part}: missing {missing}, extra {extra}, changed "
                       f"{[(k, g[k], w[k]) for k in changed]}")
        elif isinstance(g, list) and isinstance(w, list):
            out.append(f"{where} {part}: missing {sorted(set(w) - set(g))}, extra "
                       f"{sorted(set(g) - set(w))}" + ("" if set(g) != set(w) else
                                                       f", order {g} (was {w})"))
        else:
            out.append(f"{where} {part}: {g!r} (was {w!r})")
    return out


def differences(client, spec: str) -> list[str]:
    """How the record of the spec's latest campaign in the store departs from the fixture's
    (entries that depend on optional weights are left out when those differ)."""
    got, want = campaign_record(client, spec), load_fixture()["campaigns"][spec]
    drop = unavailable(got) != unavailable(want)
    got, want = comparable(got, drop), comparable(want, drop)
    out = _compare("experiment", got["experiment"], want["experiment"])
    out += _compare("parent", got["parent"], want["parent"])
    kids_got, kids_want = got["children"], want["children"]
    if set(kids_got) != set(kids_want):
        out.append(f"children: {sorted(kids_got)} (was {sorted(kids_want)})")
    for key in sorted(set(kids_got) & set(kids_want)):
        out += _compare(f"child {key}", kids_got[key], kids_want[key])
    return out


def write_fixture(work: Path) -> dict:
    """Run the smoke campaigns into `work` and write the fixture from their store."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from mlflow.tracking import MlflowClient
    from sftok_experiments.cli import main

    store = work / "mlruns"
    for spec, args in CAMPAIGNS.items():  # each from nothing, as the tests run them
        rc = main([*args, "--tracking-uri", str(store), "--work-dir", str(work / spec / "runs"),
                   "--cache-dir", str(work / spec / "cache"), "--progress-every", "-1"])
        assert rc == 0, args
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    record = {"campaigns": {spec: campaign_record(client, spec) for spec in CAMPAIGNS}}
    FIXTURE.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/record_fixture.py --write   (runs two smoke campaigns, "
                 "rewrites tests/fixtures/run_record.json)")
    with tempfile.TemporaryDirectory(prefix="run-record-") as d:
        write_fixture(Path(d))
    print(f"wrote {FIXTURE}")
