"""Experiment specs: every shipped spec parses and expands; bad specs stop before any compute,
naming the file and the field (issue 5, DESIGN §2)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from sftok_experiments import cli
from sftok_experiments.expand import expand, parse_data, parse_set
from sftok_experiments.spec import (
    STAGES,
    SpecError,
    list_specs,
    load_spec,
    parse_spec,
)

SPECS = list_specs()
REQUIRED = {"ablation_sfvr_warmup", "ablation_replace_ratio", "step_sweep", "per_step_trace",
            "reconstruction"}


def test_shipped_specs_present():
    assert REQUIRED <= set(SPECS)
    assert any(load_spec(n)[0].search is not None for n in SPECS), "an Optuna search example"


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("preset", [None, "smoke", "sftok-b"])
def test_spec_parses_and_expands(name, preset):
    spec, path = load_spec(name)
    plan = expand(spec, path, preset=preset)
    assert plan.trials
    assert len({t.key for t in plan.trials}) == len(plan.trials)
    for t in plan.trials:
        assert t.config.preset == (preset or spec.preset)
        assert t.stages and all(s in STAGES for s in t.stages)
        assert t.config.seed == t.seed


@pytest.mark.parametrize("name", SPECS)
def test_dry_run(name, capsys):
    assert cli.main([name, "--preset", "smoke", "--seeds", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"spec {name}" in out and "trial(s)" in out


def test_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert name in out
    assert "INVALID" not in out


def test_replace_ratio_arms():
    spec, path = load_spec("ablation_replace_ratio")
    plan = expand(spec, path, preset="smoke", seeds=1)
    assert [t.arm for t in plan.trials] == ["replace_ratio=0.5", "replace_ratio=0.8",
                                           "replace_ratio=1.0"]
    assert [t.config.train.stage2.replace_ratio for t in plan.trials] == [0.5, 0.8, 1.0]
    assert all(t.stages == ["stage1", "stage2"] for t in plan.trials)
    assert all(t.config.train.stage2.replacement == "sfvr" for t in plan.trials)


def test_warmup_arms_share_the_step_budget():
    """Table 3: arms without warm-up spend the stage-1 + stage-2 budget in stage 2."""
    spec, path = load_spec("ablation_sfvr_warmup")
    for preset in ("smoke", "tiny"):
        plan = expand(spec, path, preset=preset, seeds=1,
                      sets={"train.stage1.steps": "7"} if preset == "smoke" else None)
        totals = {t.arm: sum(getattr(t.config.train, s).steps for s in t.stages)
                  for t in plan.trials}
        assert len(set(totals.values())) == 1, totals
        by_arm = {t.arm: t for t in plan.trials}
        assert by_arm["vanilla_no_warmup"].stages == ["stage2"]
        assert by_arm["vanilla_no_warmup"].config.train.stage2.replacement == "vanilla"
        assert by_arm["sfvr_warmup"].stages == ["stage1", "stage2"]


def test_seeds_and_set_override():
    spec, path = load_spec("step_sweep")
    plan = expand(spec, path, preset="smoke", seeds=3, sets=parse_set(["train.stage2.steps=5",
                                                                        "decode.confidence_noise=0.5"]))
    assert [t.seed for t in plan.trials] == [0, 1, 2] * 4  # arms: stage3/stage2 × tau 0/1
    assert all(t.config.train.stage2.steps == 5 for t in plan.trials)
    assert all(t.config.decode.confidence_noise == 0.5 for t in plan.trials)
    assert plan.trials[0].config.eval.decode_steps == (1, 2, 4, 8, 16)


def test_data_option(tmp_path):
    spec, path = load_spec("ablation_replace_ratio")
    plan = expand(spec, path, preset="sftok-b", seeds=1,
                  data=parse_data([f"imagenet={tmp_path}"]))
    d = plan.trials[0].config.data
    assert (d.source, d.path) == ("folder", str(tmp_path))
    with pytest.raises(SpecError, match=r"--data: imagenet=.*missing.*is not a directory"):
        parse_data([f"imagenet={tmp_path / 'missing'}"])
    d = parse_data(["imagenet=/s/train-{0000..0009}.tar,/s/val-{0000..0001}.tar"])
    assert d["data.source"] == "webdataset" and d["data.val_path"].startswith("/s/val")


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    """Ray runs trials in their trial dir: file paths are resolved against the driver's cwd."""
    from sftok_experiments.expand import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel" / "path").mkdir(parents=True)
    spec = parse_spec(_with(overrides={"data.val_path": "val/imgs"}), "s.yaml")
    plan = expand(spec, Path("s.yaml"), data=parse_data(["imagenet=rel/path"]),
                  sets=parse_set(["teacher.weights=rel.bin"]))
    for t in plan.trials:
        assert t.config.data.path == str(tmp_path / "rel" / "path")
        assert t.config.data.val_path == str(tmp_path / "val" / "imgs")
        assert t.config.teacher.weights == str(tmp_path / "rel.bin")
    d = expand(spec, Path("s.yaml"), data=parse_data(["imagenet=sh/train-{0..9}.tar"])
               ).trials[0].config.data
    assert d.path == str(tmp_path / "sh" / "train-{0..9}.tar")
    cfg = plan.trials[0].config
    assert absolute_paths(cfg) == {}  # already absolute: unchanged
    base = expand(parse_spec(GOOD, "g.yaml"), Path("g.yaml")).trials[0].config
    assert absolute_paths(base) == {}  # embedded data, no weights file: nothing to resolve


def test_campaign_hash_tracks_the_trials():
    spec, path = load_spec("ablation_replace_ratio")
    a = expand(spec, path, preset="smoke", seeds=1).campaign_hash
    assert a == expand(spec, path, preset="smoke", seeds=1).campaign_hash
    assert a != expand(spec, path, preset="smoke", seeds=2).campaign_hash
    assert a != expand(spec, path, preset="smoke", seeds=1,
                       sets={"train.stage1.steps": "2"}).campaign_hash


# --------------------------------------------------------------------------------------------
# Bad specs: an error naming file and field, before any compute
# --------------------------------------------------------------------------------------------

GOOD = {"name": "bad", "preset": "smoke", "stages": ["stage1", "stage2"],
        "arms": {"grid": {"train.stage2.replace_ratio": [0.5, 1.0]}}, "seeds": 1}


def _with(**changes):
    d = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, v in changes.items():
        node = d
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return d


BAD = [
    # (case, spec document, field named in the error, words in the message)
    ("unknown top-level key", _with(seed=3), "seed", "unknown key"),
    ("unknown nested key", _with(evaluation={"decode_step": [8]}), "evaluation.decode_step",
     "unknown key"),
    ("unknown arm key", _with(arms={"named": [{"name": "a", "overides": {}}]}),
     "arms.named[0].overides", "unknown key"),
    ("bad type", _with(seeds="three"), "seeds", "valid integer"),
    ("bad type nested", _with(evaluation={"decode_steps": ["eight"]}),
     "evaluation.decode_steps[0]", "integer"),
    ("unknown stage", _with(stages=["stage1", "stage9"]), "stages[1]", "stage1"),
    ("stage 0 is not a pipeline stage", _with(stages=["stage0", "stage1"]), "stages[0]", "'stage1'"),
    ("unknown arm stage", _with(arms={"named": [{"name": "a", "stages": ["stage4"]}]}),
     "arms.named[0].stages[0]", "'stage1'"),
    ("stages out of order", _with(stages=["stage2", "stage1"]), "stages", "order"),
    ("unknown config field in grid", _with(arms={"grid": {"train.stage2.replace_ration": [1.0]}}),
     "arms.grid.train.stage2.replace_ration", "unknown field"),
    ("bad config value type", _with(overrides={"train.stage2.steps": "many"}),
     "overrides.train.stage2.steps", "integer"),
    ("bad config literal", _with(arms={"named": [{"name": "a", "overrides": {
        "train.stage2.replacement": "magic"}}]}),
     "arms.named[0].overrides.train.stage2.replacement", "one of"),
    ("bad config range", _with(arms={"grid": {"train.stage2.replace_ratio": [1.5]}}),
     "arms.grid.train.stage2.replace_ratio", "[0, 1]"),
    ("unknown preset", _with(preset="huge"), "preset", "unknown preset"),
    ("search dim", _with(arms={}, search={"space": {"train.stage2.optim.lr": {"logunif": [1, 2]}},
                                          "metric": "eval/psnr_s8", "mode": "max",
                                          "num_samples": 2}),
     "search.space.train.stage2.optim.lr.logunif", "unknown key"),
    ("search reversed bounds", _with(arms={}, search={
        "space": {"train.stage2.optim.lr": {"loguniform": [1e-2, 1e-4]}},
        "metric": "eval/psnr_s1", "mode": "max", "num_samples": 2}), "search.space",
     "low must be < high"),
    ("search reversed randint", _with(arms={}, search={
        "space": {"train.stage2.steps": {"randint": [5, 5]}},
        "metric": "eval/psnr_s1", "mode": "max", "num_samples": 2}), "search.space",
     "low must be < high"),
    ("search empty choice", _with(arms={}, search={
        "space": {"train.stage2.replacement": {"choice": []}},
        "metric": "eval/psnr_s1", "mode": "max", "num_samples": 2}), "search.space",
     "at least one value"),
    ("search choice out of range", _with(arms={}, search={
        "space": {"train.stage2.replace_ratio": {"choice": [0.5, 1.5]}},
        "metric": "eval/psnr_s1", "mode": "max", "num_samples": 2}),
     "search.space.train.stage2.replace_ratio", "[0, 1]"),
    ("search bound out of range", _with(arms={}, search={
        "space": {"train.stage2.replace_ratio": {"uniform": [0.5, 1.2]}},
        "metric": "eval/psnr_s1", "mode": "max", "num_samples": 2}),
     "search.space.train.stage2.replace_ratio", "[0, 1]"),
    ("search bad choice literal", _with(arms={}, search={
        "space": {"train.stage2.replacement": {"choice": ["sfvr", "magic"]}},
        "metric": "eval/psnr_s1", "mode": "max", "num_samples": 2}),
     "search.space.train.stage2.replacement", "one of"),
    ("search metric not evaluated", _with(arms={}, evaluation={"decode_steps": [1, 4]}, search={
        "space": {"train.stage2.replace_ratio": {"uniform": [0.5, 1.0]}},
        "metric": "eval/psnr_s8", "mode": "max", "num_samples": 2}), "search.metric",
     "not reported"),
    ("search metric not measured", _with(arms={}, evaluation={"metrics": ["psnr"]}, search={
        "space": {"train.stage2.replace_ratio": {"uniform": [0.5, 1.0]}},
        "metric": "eval/token_top1", "mode": "max", "num_samples": 2}), "search.metric",
     "not reported"),
    ("search train metric", _with(arms={}, search={
        "space": {"train.stage2.replace_ratio": {"uniform": [0.5, 1.0]}},
        "metric": "train/stage2/loss", "mode": "min", "num_samples": 2}), "search.metric",
     "eval metric"),
    ("stage_steps outside the arm's pipeline", _with(arms={"named": [
        {"name": "a", "stages": ["stage2"], "stage_steps": {"stage1": 5}}]}),
     "arms.named[0].stage_steps.stage1", "not a stage of this arm"),
    ("stage_steps outside the spec's pipeline", _with(arms={"named": [
        {"name": "a", "stage_steps": {"stage3": 5}}]}),
     "arms.named[0].stage_steps.stage3", "not a stage of this arm"),
    ("search mode", _with(arms={}, search={"space": {"train.stage2.optim.lr": {"uniform": [1, 2]}},
                                           "metric": "eval/psnr_s8", "mode": "maximise",
                                           "num_samples": 2}), "search.mode", "'min' or 'max'"),
]


@pytest.mark.parametrize("case,doc,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_names_file_and_field(tmp_path, case, doc, field, words):
    f = tmp_path / "bad_spec.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as ei:
        spec, path = load_spec(str(f))
        expand(spec, path)
    err = ei.value
    assert err.file.endswith("bad_spec.yaml"), err
    assert err.field == field, str(err)
    assert "bad_spec.yaml" in str(err) and field in str(err)
    assert words in str(err)


def test_bad_spec_stops_the_cli_before_compute(tmp_path, monkeypatch, capsys):
    """The CLI exits 2 with file + field, and never reaches the campaign (no Ray, no MLflow)."""
    from sftok_experiments import campaign

    def boom(*a, **k):
        raise AssertionError("compute started for a bad spec")

    monkeypatch.setattr(campaign, "run_campaign", boom)
    f = tmp_path / "typo.yaml"
    f.write_text(yaml.safe_dump(_with(stages=["stage1", "stage5"])))
    store = tmp_path / "store"
    assert cli.main([str(f), "--tracking-uri", str(store)]) == 2
    err = capsys.readouterr().err
    assert "typo.yaml" in err and "stages[1]" in err
    assert not store.exists()
    # A bad --set is caught the same way.
    assert cli.main(["ablation_replace_ratio", "--set", "train.stage2.nope=1",
                     "--tracking-uri", str(store)]) == 2
    assert "train.stage2.nope" in capsys.readouterr().err
    assert cli.main(["no_such_spec"]) == 2
    assert "unknown spec" in capsys.readouterr().err
    assert not store.exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_search_metric_reported_ok():
    """An S-independent metric and any evaluated S are accepted."""
    for metric in ("eval/token_top1", "eval/ssim_s4", "eval/psnr_s1"):
        spec = parse_spec(_with(arms={}, search={
            "space": {"train.stage2.replace_ratio": {"uniform": [0.5, 1.0]},
                      "train.stage2.steps": {"randint": [1, 3]}},
            "metric": metric, "mode": "max", "num_samples": 2}), "s.yaml")
        assert expand(spec, Path("s.yaml")).search["metric"] == metric


@pytest.mark.parametrize("opt,item", [("--set", "train.stage2.replace_ratio=0.9"),
                                      ("--set", "train.stage2.replacement=vanilla"),
                                      ("--data", "embedded")])
def test_cli_cannot_override_an_arm_variable(tmp_path, opt, item):
    """--set / --data on a grid key or a named arm's override key would make the arms identical
    while their labels differ: refused, naming the key."""
    f = tmp_path / "arms.yaml"
    f.write_text(yaml.safe_dump(_with(arms={
        "grid": {"train.stage2.replace_ratio": [0.5, 1.0]},
        "named": [{"name": "a", "overrides": {"train.stage2.replacement": "sfvr",
                                              "data.source": "embedded"}}]})))
    spec, path = load_spec(str(f))
    with pytest.raises(SpecError) as ei:
        if opt == "--set":
            expand(spec, path, sets=parse_set([item]))
        else:
            expand(spec, path, data=parse_data([item]))
    assert ei.value.file == opt and "arm variable" in str(ei.value)
    assert ei.value.field in ("train.stage2.replace_ratio", "train.stage2.replacement",
                              "data.source")
    # Shipped spec, through the CLI: exit 2 before compute.
    if opt == "--set" and "ratio" in item:
        assert cli.main(["ablation_replace_ratio", "--set", item, "--dry-run"]) == 2


@pytest.mark.parametrize("argv,words", [
    (["--seeds", "0"], "--seeds: must be >= 1"), (["--seeds", "-1"], "--seeds: must be >= 1"),
    (["--max-concurrent", "0"], "--max-concurrent must be >= 1")])
def test_cli_rejects_bad_counts(argv, words, capsys):
    assert cli.main(["ablation_replace_ratio", "--dry-run", *argv]) == 2
    assert words in capsys.readouterr().err
    if argv[0] == "--seeds":
        spec, path = load_spec("ablation_replace_ratio")
        with pytest.raises(SpecError):
            expand(spec, path, seeds=int(argv[1]))


def test_parse_spec_rejects_non_mapping():
    with pytest.raises(SpecError):
        parse_spec(["a"], "x.yaml")
