"""Full-size key coverage: the released SFTok-B / SFTok-L (finetuned decoder) and MaskGIT-VQGAN
state dicts (tests/fixtures/official_state_dicts.json, key -> shape) map one-to-one onto our
models, built on the `meta` device (no weights, no memory)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sftok.config import TeacherConfig, proxy_grid
from sftok.official import (
    convert_official_state_dict,
    export_official_state_dict,
    infer_tokenizer_config,
    map_official_key,
)
from sftok.presets import get_preset
from sftok.teacher import MaskGitVQGAN, infer_teacher_config
from sftok.tokenizer import SFTok


@pytest.fixture(scope="module")
def tables(fixtures_dir):
    return json.loads((fixtures_dir / "official_state_dicts.json").read_text())


def _meta_sd(table: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in table.items()}


def _shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _build(preset: str) -> SFTok:
    cfg = get_preset(preset)
    tok = dataclasses.replace(cfg.tokenizer, finetune_decoder=True)  # the released files have pixel_*
    with torch.device("meta"):
        return SFTok(tok, cfg.teacher.codebook_size, proxy_grid(cfg), cfg.teacher)


@pytest.mark.parametrize("name,preset", [("sftok_b", "sftok-b"), ("sftok_l", "sftok-l")])
def test_sftok_keys_map_one_to_one(tables, name, preset):
    table = tables[name]
    model = _build(preset)
    ours = _shapes(model.state_dict())

    # Every official key maps to exactly one of ours ...
    kept = [map_official_key(k) for k in table]
    assert len(kept) == len(set(kept)), "two official keys map to the same parameter"
    assert not set(kept) - set(ours), f"official keys with no target: {sorted(set(kept) - set(ours))[:5]}"
    # ... with the right shape after the mapping's reshapes, and none of ours lacks a source.
    mapped = _shapes(convert_official_state_dict(_meta_sd(table)))
    assert not set(ours) - set(mapped), f"our keys without a source: {sorted(set(ours) - set(mapped))[:5]}"
    bad = {k: (mapped[k], ours[k]) for k in ours if mapped[k] != ours[k]}
    assert not bad, f"shape mismatches (official, ours): {bad}"


@pytest.mark.parametrize("name,preset", [("sftok_b", "sftok-b"), ("sftok_l", "sftok-l")])
def test_export_is_inverse_of_import(tables, name, preset):
    assert _shapes(export_official_state_dict(_build(preset))) == {
        k: tuple(v) for k, v in tables[name].items()}


@pytest.mark.parametrize("name,preset", [("sftok_b", "sftok-b"), ("sftok_l", "sftok-l")])
def test_inferred_config_matches_preset(tables, name, preset):
    cfg = get_preset(preset)
    tok, num_codes, grid, teacher = infer_tokenizer_config(_meta_sd(tables[name]))
    assert (num_codes, grid) == (cfg.teacher.codebook_size, proxy_grid(cfg))
    expected = dataclasses.replace(
        cfg.tokenizer, finetune_decoder=True,
        encoder=dataclasses.replace(cfg.tokenizer.encoder, legacy_reshape=True))
    assert tok == expected
    shape = lambda t: (t.hidden_channels, t.channel_mult, t.num_res_blocks, t.z_channels,
                       t.codebook_size)
    assert shape(teacher) == shape(cfg.teacher)


def test_teacher_keys_identical(tables):
    table = {k: tuple(v) for k, v in tables["maskgit_vqgan"].items()}
    with torch.device("meta"):
        model = MaskGitVQGAN(TeacherConfig())  # defaults = MaskGIT-VQGAN f16, 1024 codes
    assert _shapes(model.state_dict()) == table
    assert infer_teacher_config(_meta_sd(table)) == TeacherConfig()


def test_tiny_import_export_round_trip(fixtures_dir):
    """Values survive official -> ours -> official unchanged (incl. the 1×1-conv reshapes)."""
    from safetensors.torch import load_file

    from sftok.official import import_official_sftok

    sd = load_file(fixtures_dir / "sftok_tiny_official.safetensors")
    model, _ = import_official_sftok(sd)
    back = export_official_state_dict(model)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_import_refuses_several_codebook_groups(fixtures_dir):
    from safetensors.torch import load_file

    sd = load_file(fixtures_dir / "sftok_tiny_official.safetensors")
    assert convert_official_state_dict(sd)["quantize.index_offset"].tolist() == [0]
    sd["quantize.index_offset"] = torch.tensor([0, 64])
    with pytest.raises(ValueError, match="only one quantizer group"):
        convert_official_state_dict(sd)
