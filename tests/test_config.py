"""Config layer: presets build and validate, overrides are typed, round trips are lossless."""
from __future__ import annotations

import json

import pytest

from sftok.config import (
    ConfigError,
    ExperimentConfig,
    flatten,
    from_dict,
    override,
    proxy_grid,
    to_dict,
)
from sftok.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_round_trips_through_json(name):
    cfg = get_preset(name)
    assert cfg.preset == name
    back = from_dict(ExperimentConfig, json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg


def test_paper_presets_follow_table6():
    b, l = get_preset("sftok-b"), get_preset("sftok-l")
    for cfg in (b, l):
        tok = cfg.tokenizer
        assert (tok.image_size, tok.num_latent_tokens, tok.token_size) == (256, 64, 32)
        assert (tok.encoder.width, tok.encoder.depth, tok.encoder.patch_size) == (768, 12, 16)
        assert (tok.quantizer.kind, tok.quantizer.codebook_size) == ("optvq", 8192)
        assert cfg.teacher.codebook_size == 1024 and proxy_grid(cfg) == 16
        assert cfg.train.stage1.steps == 200_000 and cfg.train.stage2.steps == 800_000
        for st in (cfg.train.stage1, cfg.train.stage2):  # 32 per GPU x 8 GPUs
            assert (st.batch_size, st.batch_size * st.grad_accum) == (32, 256)
        s3 = cfg.train.stage3  # 8 per GPU x 8 GPUs x 2 accumulation
        assert (s3.batch_size, s3.batch_size * s3.grad_accum) == (8, 128)
    assert (b.tokenizer.decoder.width, b.tokenizer.decoder.depth) == (768, 12)
    assert (l.tokenizer.decoder.width, l.tokenizer.decoder.depth) == (1024, 24)


def test_override_parses_strings_against_field_types():
    cfg = override(get_preset("smoke"), {"train.stage2.replace_ratio": "0.5",
                                         "train.stage2.steps": "7",
                                         "eval.decode_steps": "[1, 8]",
                                         "tokenizer.quantizer.assign_at_inference": "sinkhorn"})
    assert cfg.train.stage2.replace_ratio == 0.5
    assert cfg.train.stage2.steps == 7
    assert cfg.eval.decode_steps == (1, 8)
    assert cfg.tokenizer.quantizer.assign_at_inference == "sinkhorn"


@pytest.mark.parametrize("key,value,field", [
    ("train.stage2.bogus", "1", "train.stage2.bogus"),
    ("nope.steps", "1", "nope"),
    ("train.stage2.steps", "many", "train.stage2.steps"),
    ("train.stage2.steps", "1.5", "train.stage2.steps"),
    ("train.stage2.replacement", "sometimes", "train.stage2.replacement"),
    ("train.stage2.replace_ratio", "1.5", "train.stage2.replace_ratio"),
    ("tokenizer.encoder.patch_size", "5", "tokenizer.encoder.patch_size"),
])
def test_bad_overrides_name_the_field(key, value, field):
    with pytest.raises(ConfigError) as err:
        override(get_preset("smoke"), {key: value})
    assert err.value.field == field
    assert field in str(err.value)


def test_flatten_gives_dotted_keys():
    flat = flatten(to_dict(get_preset("tiny")))
    assert flat["train.stage2.replace_ratio"] == 1.0
    assert flat["tokenizer.encoder.width"] == get_preset("tiny").tokenizer.encoder.width
    assert not any(isinstance(v, dict) for v in flat.values())


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="smoke"):
        get_preset("huge")


def test_exponent_floats_from_yaml_are_numbers():
    # PyYAML (YAML 1.1) reads `1e-4` as a string; float fields must still accept it.
    cfg = override(get_preset("smoke"), {"train.stage2.optim.lr": "1e-4",
                                         "train.stage1.optim.end_lr": "2E-5"})
    assert cfg.train.stage2.optim.lr == 1e-4 and cfg.train.stage1.optim.end_lr == 2e-5
    with pytest.raises(ConfigError, match="expected a number"):
        override(get_preset("smoke"), {"train.stage2.optim.lr": "fast"})
