"""Large campaigns (issue 21): expansion that scales, a dry-run summary, a size limit that asks
for --yes before any compute, and arm labels that print values as written and stay stable
across runs and resumes (also of stores written with the older labels)."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import ray.cloudpickle
from campaign_helpers import campaign_runs, plan_for
from campaign_helpers import write_spec as smoke_spec
from sftok_experiments import cli
from sftok_experiments.expand import expand, float_label
from sftok_experiments.overview import SUMMARY_ABOVE, stage_needs
from sftok_experiments.protocol import report_final, report_stage_done, report_train, trial_key
from sftok_experiments.spec import DEFAULT_MAX_TRIALS, load_spec
from sftok_experiments.stage_store import StageStore

from sftok.config import override
from sftok.presets import get_preset

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fake trial below

GENERATED_LRS = [1e-5 * i for i in range(1, 11)]  # 3 * 1e-5 == 3.0000000000000004e-05


def write_spec(tmp_path: Path, name: str, grid: dict, **extra) -> Path:
    return smoke_spec(tmp_path, name, arms={"grid": grid}, **extra)


# --------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------


def test_override_rebuilds_only_the_path_it_changes():
    base = get_preset("smoke")
    cfg = override(base, {"train.stage2.optim.lr": 3e-4, "seed": 4})
    assert cfg.train.stage2.optim.lr == 3e-4 and cfg.seed == 4
    assert base.train.stage2.optim.lr != 3e-4  # the original is untouched (frozen)
    # Sections off the path are the same objects: 10,000 trials do not hold 10,000 copies.
    assert cfg.tokenizer is base.tokenizer and cfg.train.stage1 is base.train.stage1
    assert cfg.train.stage2 is not base.train.stage2
    # Fields that must agree can change together: the checks across fields run on the result.
    both = override(base, {"tokenizer.image_size": 32, "data.image_size": 32})
    assert both.tokenizer.image_size == both.data.image_size == 32


def test_a_large_grid_expands_with_shared_sections(tmp_path):
    """2,000 trials: every key unique, each config right, unchanged sections shared."""
    rr = [round(0.02 * i, 2) for i in range(1, 51)]
    plan = plan_for(write_spec(tmp_path, "grid2k", {"train.stage2.optim.lr": GENERATED_LRS[:8],
                                                  "train.stage2.replace_ratio": rr},
                              seeds=5, max_trials=5000))
    assert plan.size == len(plan.trials) == 8 * 50 * 5
    assert len({t.key for t in plan.trials}) == len(plan.trials)
    first = plan.trials[0].config
    assert all(t.config.tokenizer is first.tokenizer and t.config.data is first.data
               for t in plan.trials)
    for t in plan.trials[::97]:
        assert t.config.train.stage2.optim.lr == t.arm_values["train.stage2.optim.lr"]
        assert t.config.train.stage2.replace_ratio == t.arm_values["train.stage2.replace_ratio"]
        assert t.config.seed == t.seed


def test_arm_labels_print_floats_as_written(tmp_path):
    assert [float_label(v) for v in GENERATED_LRS[:3]] == ["1e-05", "2e-05", "3e-05"]
    assert [float_label(v) for v in (1.0, 0.5, 0.1 + 0.2, 1e16, -2.5e-7)] == \
        ["1.0", "0.5", "0.3", "1e+16", "-2.5e-07"]
    plan = plan_for(write_spec(tmp_path, "lrs", {"train.stage2.optim.lr": GENERATED_LRS[:4]}))
    assert [t.arm for t in plan.trials] == ["lr=1e-05", "lr=2e-05", "lr=3e-05", "lr=4e-05"]
    # The config keeps the value itself; only the label is written short.
    assert plan.trials[2].config.train.stage2.optim.lr == 3 * 1e-5 != 3e-05
    # The same labels and campaign on every expansion (and so on every --resume).
    again = plan_for(write_spec(tmp_path, "lrs", {"train.stage2.optim.lr": GENERATED_LRS[:4]}))
    assert [t.key for t in again.trials] == [t.key for t in plan.trials]
    assert again.campaign_hash == plan.campaign_hash


def test_values_equal_to_15_digits_keep_their_exact_labels(tmp_path):
    close = [0.1, 0.1 + 1e-17 * 2 ** 4]  # differ in the last bits only
    assert close[0] != close[1] and float_label(close[0]) == float_label(close[1])
    plan = plan_for(write_spec(tmp_path, "close", {"train.stage2.replace_ratio": close}))
    assert [t.arm for t in plan.trials] == [f"replace_ratio={v!r}" for v in close]


def test_campaign_hash_is_the_sha256_of_the_whole_plan_and_ignores_max_trials(tmp_path):
    """The hash is fed one trial at a time: it must be the hash of the one JSON document
    (earlier stores hold campaigns under it), and a confirmation threshold is not part of it."""
    path = write_spec(tmp_path, "h", {"train.stage2.replace_ratio": [0.5, 1.0]})
    plan = plan_for(path, seeds=2)
    blob = json.dumps({"spec": plan.spec.model_dump(mode="json", exclude={"max_trials"}),
                       "preset": plan.preset, "trials": [t.to_payload() for t in plan.trials]},
                      sort_keys=True, default=str)
    assert plan.campaign_hash == hashlib.sha256(blob.encode()).hexdigest()[:16]
    bigger_limit = write_spec(tmp_path, "h", {"train.stage2.replace_ratio": [0.5, 1.0]},
                              max_trials=7)
    assert plan_for(bigger_limit, seeds=2).campaign_hash == plan.campaign_hash


def test_legacy_labels_are_those_of_repr(tmp_path):
    plan = plan_for(write_spec(tmp_path, "leg", {"train.stage2.optim.lr": GENERATED_LRS[:3],
                                                "train.stage2.replace_ratio": [0.5]}))
    old = plan.with_legacy_labels()
    assert [t.arm for t in old.trials] == [f"lr={v!r},replace_ratio=0.5" for v in
                                           GENERATED_LRS[:3]]
    assert old.trials[2].key == "lr=3.0000000000000004e-05-replace_ratio=0.5_s0"
    assert [t.config for t in old.trials] == [t.config for t in plan.trials]
    assert old.campaign_hash != plan.campaign_hash
    tidy = plan_for(write_spec(tmp_path, "tidy", {"train.stage2.replace_ratio": [0.5, 1.0]}))
    assert tidy.with_legacy_labels() is None  # nothing to fall back to


# --------------------------------------------------------------------------------------------
# Dry run and the size limit
# --------------------------------------------------------------------------------------------


def test_dry_run_summarises_a_large_plan_and_verbose_lists_it(tmp_path, capsys):
    n = SUMMARY_ABOVE + 10
    rr = [round(1.0 - 0.001 * i, 3) for i in range(n)]
    path = write_spec(tmp_path, "big", {"train.stage2.replace_ratio": rr})
    args = [str(path), "--dry-run", "--work-dir", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"{n} trial(s)" in out and "arm=" not in out  # no line per trial
    assert f"train.stage2.replace_ratio  {n:>5,} value(s): 1.0, 0.999, 0.998, …," in out
    assert "seeds: 1 (0)" in out and "--verbose" in out
    # One stage 1 shared by every arm, one stage 2 per arm; a teacher to train first.
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith("  stage")}
    assert lines["stage0"][:2] == ["stage0", "1"] and lines["stage1"][:2] == ["stage1", "1"]
    assert lines["stage2"][1] == str(n)
    assert cli.main(args + ["--verbose"]) == 0
    out = capsys.readouterr().out
    assert sum(ln.startswith("  replace_ratio=") for ln in out.splitlines()) == n


def test_stage_needs_count_what_the_store_already_holds(tmp_path):
    spec, path = load_spec("ablation_replace_ratio")
    plan = expand(spec, path, preset="smoke", seeds=3)
    root = tmp_path / "stages"
    needs = {n.stage: n for n in stage_needs(plan, root, tmp_path / "teachers")}
    steps = plan.trials[0].config.train
    assert (needs["stage1"].distinct, needs["stage1"].to_train) == (3, 3)  # one per seed
    assert (needs["stage2"].distinct, needs["stage2"].present) == (9, 0)
    assert needs["stage2"].steps_to_train == 9 * steps.stage2.steps
    assert needs["stage1"].steps_if_unshared == 9 * steps.stage1.steps
    # Publish the stage-1 result of seed 0 under its real key: it is counted as reused.
    from sftok.train.stages import stage_identity, stage_key

    key = stage_key(stage_identity(plan.trials[0].config, "stage1", None))
    result = tmp_path / "result"
    result.mkdir()
    (result / "stage.json").write_text('{"steps": 1}')
    StageStore(root).publish(key, result)
    needs = {n.stage: n for n in stage_needs(plan, root, tmp_path / "teachers")}
    assert (needs["stage1"].present, needs["stage1"].to_train) == (1, 2)
    assert needs["stage1"].steps_to_train == 2 * steps.stage1.steps
    unshared = {n.stage: n for n in stage_needs(plan, root, None, share=False)}
    assert (unshared["stage1"].distinct, unshared["stage1"].present) == (9, 0)


def test_a_campaign_above_max_trials_needs_yes_before_any_compute(tmp_path, monkeypatch,
                                                                    capsys):
    calls = []
    monkeypatch.setattr("sftok_experiments.campaign.run_campaign",
                        lambda plan, opts: calls.append(plan) or type("R", (), {"exit_code": 0}))
    path = write_spec(tmp_path, "toomany",
                      {"train.stage2.replace_ratio": [round(0.01 * i, 2) for i in range(1, 101)]},
                      seeds=2)
    store = tmp_path / "store"
    args = [str(path), "--tracking-uri", str(store), "--work-dir", str(tmp_path / "runs")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: 200 trials is more than this spec's max_trials "
                   f"({DEFAULT_MAX_TRIALS}); nothing has run yet: pass --yes to run them (or "
                   "set max_trials in the spec; --dry-run summarises them)")
    assert not calls and not store.exists()  # no store, no Ray, nothing trained
    assert cli.main(args + ["--yes"]) == 0 and len(calls) == 1
    # On a terminal it asks; "y" goes ahead, anything else does not.
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    for answer, code in (("n", 2), ("y", 0)):
        monkeypatch.setattr("builtins.input", lambda prompt, a=answer: a)
        assert cli.main(args) == code
    assert len(calls) == 2
    # A spec that says it is that large runs without asking.
    big_ok = write_spec(tmp_path, "toomany",
                        {"train.stage2.replace_ratio": [round(0.01 * i, 2) for i in range(1, 101)]},
                        seeds=2, max_trials=200)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    assert cli.main([str(big_ok)] + args[1:]) == 0 and len(calls) == 3


# --------------------------------------------------------------------------------------------
# Resume of a store written with the older labels
# --------------------------------------------------------------------------------------------


def make_fake(log_dir: Path, fail_key: str | None = None):
    """A trial function: two train reports, stage_done events, the final report; each run
    leaves a marker file `<key>.<ns>`; `fail_key` fails that trial."""
    log_dir = str(log_dir)

    def fake_trial(config):
        key = trial_key(config)
        Path(log_dir, f"{key}.{time.time_ns()}").write_text("ran")
        if key == fail_key:
            raise ValueError(f"injected failure of {key}")
        for step, stage in enumerate(config["trial"]["stages"], start=1):
            report_train(stage, step, {"loss": 1.0 / step})
            report_stage_done(stage, step)
        out = Path(tempfile.mkdtemp()) / "artifacts"
        out.mkdir()
        (out / "eval.json").write_text("{}")
        report_final({"psnr_s1": 1.0}, out)

    return fake_trial


def test_resume_of_a_store_with_the_older_labels_matches_its_finished_trials(
        ray_session, store, client, tmp_path, capsys):
    from sftok_experiments.campaign import Options, run_campaign

    logs = tmp_path / "logs"
    logs.mkdir()
    plan = plan_for(write_spec(tmp_path, "old_labels",
                              {"train.stage2.optim.lr": GENERATED_LRS[:3]}))
    old = plan.with_legacy_labels()
    opts = {"tracking": str(store), "work_dir": str(tmp_path / "runs"), "prepare_teacher": False}
    # What the older runner recorded: its labels, one trial failed.
    failing = old.trials[2].key
    assert failing == "lr=3.0000000000000004e-05_s0"
    res = run_campaign(old, Options(trial_fn=make_fake(logs, fail_key=failing), **opts))
    assert res.exit_code == 1
    for f in logs.iterdir():
        f.unlink()
    capsys.readouterr()
    res = run_campaign(plan, Options(trial_fn=make_fake(logs), resume=True, **opts))
    out = capsys.readouterr().out
    assert res.exit_code == 0, out
    assert ("resuming a campaign recorded with the older arm labels (e.g. "
            "lr=3.0000000000000004e-05): keeping them, so its finished trials match") in out
    assert sorted(p.name.rsplit(".", 1)[0] for p in logs.iterdir()) == [failing]  # only it
    parents, children = campaign_runs(client, "old_labels")
    assert len(parents) == 1
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.tags["trial_key"] for c in children) == sorted(t.key for t in old.trials)
