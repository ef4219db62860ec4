"""What the campaign tests share: spec files, plans, the runs a campaign left in MLflow, a
console that keeps its lines, and a trial function for `run.py --trial-fn` in a child process."""
from __future__ import annotations

import textwrap
from pathlib import Path

import yaml
from sftok_experiments.expand import Plan, expand
from sftok_experiments.spec import load_spec

from sftok import run_record as rr

ROOT = Path(__file__).resolve().parent.parent
RATIOS = (0.5, 0.8, 1.0)  # Table 4's arms


def ratio_arms(ratios=RATIOS) -> dict:
    """A grid of replace-ratio arms (Table 4's by default)."""
    return {"grid": {"train.stage2.replace_ratio": list(ratios)}}


def write_spec(directory: Path, name: str, **fields) -> Path:
    """A spec file of smoke trials: stages 1-2, Table 4's three arms, 1 seed, no retries,
    unless `fields` say otherwise."""
    doc = {"name": name, "reproduces": "test", "preset": "smoke", "stages": ["stage1", "stage2"],
           "arms": ratio_arms(), "seeds": 1, "max_failures": 0, **fields}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def plan_for(spec_path: Path, **kw) -> Plan:
    spec, path = load_spec(str(spec_path))
    return expand(spec, path, **kw)


def campaign_runs(client, spec: str, parent_id: str | None = None) -> tuple[list, list]:
    """(parent runs, child runs) in the spec's experiment; with `parent_id`, its children."""
    exp = client.get_experiment_by_name(rr.experiment_name(spec))
    runs = rr.search_all(client, [exp.experiment_id])
    parents = [r for r in runs if rr.is_parent(r.data.tags)]
    children = [r for r in runs if rr.parent_of(r.data.tags) is not None
                and parent_id in (None, rr.parent_of(r.data.tags))]
    return parents, children


def echo_lines() -> tuple[list[str], callable]:
    """(lines, echo): an `Options.echo` that keeps every line it is given."""
    lines: list[str] = []

    def echo(*parts, file=None, flush=False):
        lines.extend(" ".join(str(p) for p in parts).splitlines())

    return lines, echo


def trial_fn_ref(directory: Path, test_file: str, module: str, expression: str) -> str:
    """`FILE:trial` for `experiments/run.py --trial-fn`: a file in `directory` that loads the
    test module `test_file` as `module` (its fakes pickle by value under that name) and binds
    `trial = <expression>` (e.g. `mod.make_fake(Path('/tmp/logs'))`, `mod` being the module)."""
    path = directory / f"{module}_trial.py"
    path.write_text(textwrap.dedent(f"""
        import importlib.util, sys
        from pathlib import Path
        spec = importlib.util.spec_from_file_location({module!r}, {str(test_file)!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules[{module!r}] = mod
        spec.loader.exec_module(mod)
    """) + f"trial = {expression}\n")
    return f"{path}:trial"
