"""The generation stage end to end (issue 12): smoke campaigns through Ray and MLflow, first
training the tokenizer in the trial, then starting from its checkpoint directory."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import record_fixture
import yaml
from campaign_helpers import campaign_runs, write_spec
from sftok_experiments.cli import main
from sftok_experiments.expand import expand
from sftok_experiments.spec import SpecError, load_spec


def _text(client, run_id: str, path: str) -> str:
    return Path(client.download_artifacts(run_id, path)).read_text()


def test_generation_sweep_smoke_end_to_end_then_from_the_checkpoint(ray_session, store, client,
                                                                    tmp_path):
    cache, work = tmp_path / "cache", tmp_path / "runs"
    common = ["--preset", "smoke", "--seeds", "1", "--tracking-uri", str(store),
              "--cache-dir", str(cache)]
    rc = main(["generation_guidance_sweep", *common, "--work-dir", str(work)])
    assert rc == 0
    # The run record is the one the runner wrote before issue 18, and the notebooks read it.
    assert record_fixture.differences(client, "generation_guidance_sweep") == []
    import mlflow_data as md

    camp = md.load_campaign("generation_guidance_sweep", str(store))
    assert len(camp.runs) == 1 and set(camp.trained_stages()) == {("stage1", "stage2")}
    assert md.has_metric(camp, "eval/sweep/constant/s4.5/tau1/sample_codebook_usage")
    assert json.loads(camp.artifact_text(camp.runs["run_id"][0], "generation.json"))["classes"]
    (run,) = campaign_runs(client, "generation_guidance_sweep")[1]
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert any(k.startswith("train/generation/") for k in m)
    assert any(k.startswith("train/stage2/") for k in m)
    n_classes = m["eval/num_classes"]
    assert m["eval/num_samples"] == 20 * n_classes  # the sweep spec's samples_per_class
    ev = json.loads(_text(client, run.info.run_id, "eval.json"))
    # gFID is a number only with the Inception weights; otherwise the reason is logged.
    assert ("eval/gfid" in m) != ("gfid" in ev["unavailable"])
    rows = list(csv.DictReader(io.StringIO(_text(client, run.info.run_id, "sweep.csv"))))
    assert len(rows) == 4 * 3 * 2  # s x schedule x tau of the spec
    assert "eval/sweep/power-cosine/s4.5/tau1/sample_codebook_usage" in m
    gen = json.loads(_text(client, run.info.run_id, "generation.json"))
    assert gen["tokens"]["assign"] == "nearest" and not gen["token_cache_hit"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert "grids/samples.png" in arts
    assert {f"grids/samples_class{c}.png" for c in gen["grid_classes"]} <= arts

    # From the checkpoint path: same tokenizer and data, so the tokens come from the cache.
    tok_dir = next(work.glob("stages/stage2-*"))  # the shared stage store (issue 10)
    spec = write_spec(tmp_path, "gen_from_ckpt", stages=["generation"], arms={},
                      overrides={"generation.tokenizer": str(tok_dir)})
    assert main([str(spec), *common, "--work-dir", str(tmp_path / "runs2")]) == 0
    (run2,) = campaign_runs(client, "gen_from_ckpt")[1]
    gen2 = json.loads(_text(client, run2.info.run_id, "generation.json"))
    assert gen2["token_cache_hit"] and gen2["tokens"] == gen["tokens"]
    assert run2.data.metrics["eval/num_samples"] == 2 * n_classes  # smoke preset: 2 per class


def test_generation_stage_needs_exactly_one_tokenizer(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "stages": ["generation"]}))
    spec, p = load_spec(str(path))
    with pytest.raises(SpecError, match="needs a tokenizer"):
        expand(spec, p, preset="smoke")
    path.write_text(yaml.safe_dump({"name": "bad", "stages": ["stage1", "generation"],
                                    "overrides": {"generation.tokenizer": "/x"}}))
    spec, p = load_spec(str(path))
    with pytest.raises(SpecError, match="keep one"):
        expand(spec, p, preset="smoke")
    path.write_text(yaml.safe_dump({"name": "bad", "stages": ["generation", "stage1"]}))
    with pytest.raises(SpecError, match="stages must be in order"):
        load_spec(str(path))
