"""Golden equivalence with the reference implementation (tests/fixtures/GOLDEN_README.md).

Both official tiny state dicts go through the import path (`import_official_sftok`,
`load_frozen_teacher`); every tensor of `tensors.safetensors` is reproduced: ids exactly, floats
to atol = 2e-5 · max(1, max|expected|). Float32 has a 1.2e-7 relative step; the deepest path
(4 decoder passes + softmax + the pixel decoder) accumulates reordered-sum differences of about
5e-6 relative to the tensor's scale on CPU, so 2e-5 keeps a ~4x margin while still catching any
real deviation (a wrong layout/epsilon/activation moves values by 1e-2 or more).
"""
from __future__ import annotations

import pytest
import torch

from sftok.config import (
    DecodeConfig,
    DecoderConfig,
    EncoderConfig,
    QuantizerConfig,
    TeacherConfig,
    TokenizerConfig,
)
from sftok.official import import_official_sftok
from sftok.teacher import load_frozen_teacher

REL_TOL = 2e-5

# The tiny configuration of the golden README.
TINY = TokenizerConfig(
    image_size=64, num_latent_tokens=8, token_size=8,
    encoder=EncoderConfig(width=64, depth=2, heads=4, mlp_ratio=4.0, patch_size=4),
    quantizer=QuantizerConfig(kind="optvq", codebook_size=128),
    decoder=DecoderConfig(width=64, depth=2, heads=4, mlp_ratio=4.0),
    finetune_decoder=True)
TINY_TEACHER = TeacherConfig(hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                             z_channels=32, codebook_size=1024)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if expected.dtype in (torch.int64, torch.int32, torch.bool):
        diff = (actual != expected).sum().item()
        assert diff == 0, f"{name}: {diff} of {expected.numel()} ids differ"
        return
    atol = REL_TOL * max(1.0, expected.abs().max().item())
    err = (actual.float() - expected).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol:.3g}"


def to_official_layout(z: torch.Tensor) -> torch.Tensor:
    """Ours B×K×C -> the reference's (B, C, 1, K)."""
    return z.transpose(1, 2)[:, :, None, :]


@pytest.fixture(scope="module")
def teacher(fixtures_dir):
    t = load_frozen_teacher(fixtures_dir / "maskgit_vqgan_tiny_official.safetensors", 64,
                            cfg=TINY_TEACHER)
    return t


def _tokenizer(fixtures_dir, assign):
    model, cfg = import_official_sftok(fixtures_dir / "sftok_tiny_official.safetensors", TINY,
                                       assign_at_inference=assign)
    assert cfg.encoder.legacy_reshape and cfg.quantizer.assign_at_inference == assign
    return model


@pytest.fixture(scope="module")
def tok_sinkhorn(fixtures_dir):
    return _tokenizer(fixtures_dir, "sinkhorn")


@pytest.fixture(scope="module")
def tok_nearest(fixtures_dir):
    return _tokenizer(fixtures_dir, "nearest")


def test_teacher(teacher, golden):
    images = golden["images"]
    with torch.no_grad():
        assert_close(teacher.model.encode(images), golden["teacher_latent"], "teacher_latent")
    assert_close(teacher.encode_ids(images), golden["teacher_codes"], "teacher_codes")
    assert_close(teacher.decode_ids(golden["teacher_codes"]), golden["teacher_decoded"],
                 "teacher_decoded")


def test_inferred_teacher_config_matches_tiny(fixtures_dir):
    t = load_frozen_teacher(fixtures_dir / "maskgit_vqgan_tiny_official.safetensors", 64)
    assert t.model.cfg == TINY_TEACHER and t.grid == 16 and t.codebook_size == 1024


def test_encoder_and_sinkhorn_quantizer(tok_sinkhorn, golden):
    with torch.no_grad():
        z = tok_sinkhorn.encoder(golden["images"])
        q = tok_sinkhorn.quantize(z)
    assert_close(to_official_layout(z), golden["encoder_out"], "encoder_out")
    assert_close(to_official_layout(q.z_q), golden["quantized"], "quantized")
    assert_close(q.ids, golden["token_ids"], "token_ids")


def test_nearest_quantizer(tok_nearest, tok_sinkhorn, golden):
    with torch.no_grad():
        q = tok_nearest.encode(golden["images"])
        q_sinkhorn = tok_sinkhorn.encode(golden["images"])
    assert_close(q.ids, golden["token_ids_nearest"], "token_ids_nearest")
    # DESIGN §1: Sinkhorn over the batch changes ids, so the two modes must really differ here.
    assert (q.ids != q_sinkhorn.ids).any()


def test_legacy_reshape_matters(fixtures_dir, golden):
    """Without the legacy flag the same weights give a different encoder (golden README item 2)."""
    model, _ = import_official_sftok(fixtures_dir / "sftok_tiny_official.safetensors", TINY)
    model.encoder.legacy_reshape = False
    with torch.no_grad():
        z = model.encoder(golden["images"])
    assert (to_official_layout(z) - golden["encoder_out"]).abs().max() > 1e-2


def test_decoder_logits(tok_sinkhorn, golden):
    with torch.no_grad():
        z_q = tok_sinkhorn.encode(golden["images"]).z_q
        all_masked = torch.full((2, 256), tok_sinkhorn.mask_id)
        assert_close(tok_sinkhorn.decoder_logits(all_masked, z_q), golden["logits_all_masked"],
                     "logits_all_masked")
        assert_close(tok_sinkhorn.decoder_logits(golden["partial_input_ids"], z_q),
                     golden["logits_partial"], "logits_partial")


@pytest.mark.parametrize("steps", [4, 8])
def test_generate(tok_sinkhorn, golden, steps):
    with torch.no_grad():
        z_q = tok_sinkhorn.encode(golden["images"]).z_q
    res = tok_sinkhorn.generate(z_q, DecodeConfig(steps=steps, temperature=0.0))
    assert_close(res.ids, golden[f"generate{steps}_ids"], f"generate{steps}_ids")
    if steps == 4:
        assert_close(res.last_logits, golden["generate4_last_logits"], "generate4_last_logits")


def test_decode_tokens_soft_pixel_path(tok_sinkhorn, golden):
    z_q = tok_sinkhorn.ids_to_latent(golden["token_ids"])
    res = tok_sinkhorn.generate(z_q, DecodeConfig(steps=4))
    with torch.no_grad():
        pixels = tok_sinkhorn.pixels_from_logits(res.last_logits)
    assert_close(pixels, golden["decode_tokens4_pixels"], "decode_tokens4_pixels")
