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


# --------------------------------------------------------------------------------------------
# Range validation (issue 13): every bad value is refused where the config is built
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dotted,value", [
    ("train.stage2.steps", -5), ("train.stage1.optim.lr", -1.0), ("train.stage1.batch_size", 0),
    ("train.stage1.grad_accum", 0), ("tokenizer.num_latent_tokens", 0),
    ("train.stage2.ema_decay", 5.0), ("eval.decode_steps", [0]), ("eval.decode_steps", []),
    ("eval.max_images", 0), ("eval.metrics", ["psnr", "fid"]), ("train.teacher.steps", 0),
    ("tokenizer.quantizer.sinkhorn_epsilon", 0.0), ("teacher.channel_mult", [1, 0]),
    ("train.stage3.optim.betas", [0.9, 1.0]), ("data.num_workers", -1), ("decode.steps", 0),
])
def test_out_of_range_values_are_refused_naming_the_field(dotted, value):
    with pytest.raises(ConfigError) as err:
        override(get_preset("smoke"), {dotted: value})
    assert err.value.field == dotted
    assert str(err.value).startswith(f"{dotted}: must ")


def test_boundary_values_are_accepted():
    cfg = override(get_preset("smoke"), {"train.stage2.ema_decay": 0.0, "eval.max_images": None,
                                         "eval.trace_steps": 0, "train.stage1.optim.grad_clip": 0,
                                         "train.stage2.replace_ratio": 1.0})
    assert cfg.train.stage2.ema_decay == 0.0 and cfg.eval.max_images is None


def _config_classes(cls=ExperimentConfig, seen=None):
    import dataclasses
    import typing

    seen = {} if seen is None else seen
    seen[cls.__name__] = cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp) and tp.__name__ not in seen:
            _config_classes(tp, seen)
    return seen


def test_every_numeric_field_has_a_range():
    """A new numeric field without a range would let bad values run again: name it here."""
    import dataclasses
    import typing

    from sftok.config import _RANGES

    missing = []
    for name, cls in _config_classes().items():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            leaves = {a for a in typing.get_args(tp) if a is not Ellipsis} or {tp}
            if leaves & {int, float} and f.name not in _RANGES.get(name, {}):
                missing.append(f"{name}.{f.name}")
    assert missing == []


def test_config_error_survives_pickling():
    import copy
    import pickle

    e = ConfigError("train.stage1.lr", "must be > 0")
    for back in (pickle.loads(pickle.dumps(e)), copy.copy(e)):
        assert (type(back), back.field, str(back)) == (ConfigError, e.field, str(e))
