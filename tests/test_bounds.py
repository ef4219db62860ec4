"""Floor (bit-matched naive codec) and ceiling (teacher reconstruction) of every evaluation."""
from __future__ import annotations

import math

import pytest
import torch
from test_eval_helpers import FakeTeacher, FakeTokenizer, batches, fake_images

from sftok.config import EvalConfig, override
from sftok.data.uint8 import to_uint8
from sftok.evaluate import evaluate
from sftok.evaluate.bounds import (
    Bounds,
    NaiveCodec,
    fit_palette,
    floor_codecs,
    thumbnail_shape,
)
from sftok.evaluate.metrics import psnr, ssim
from sftok.presets import get_preset


@pytest.mark.parametrize("pixels,shape", [(16, (4, 4)), (64, (8, 8)), (32, (4, 8)),
                                          (12, (3, 4)), (7, (1, 7)), (1, (1, 1))])
def test_thumbnail_shape_closest_to_square(pixels, shape):
    assert thumbnail_shape(pixels) == shape


@pytest.mark.parametrize("k,q", [(16, 256), (64, 8192), (32, 1024), (4, 32)])
def test_bits_equal_k_log2_q(k, q):
    codec = NaiveCodec(thumbnail_shape(k), torch.rand(q, 3))
    assert codec.bits == pytest.approx(k * math.log2(q))
    ids = codec.encode(torch.rand(2, 3, 32, 32))
    assert ids.shape == (2, k) and int(ids.max()) < q  # exactly K symbols of Q values


def test_constant_image_reconstructs_exactly():
    colour = torch.tensor([51, 153, 230]) / 255  # an 8-bit colour, as evaluation sees images
    palette = torch.cat([torch.rand(15, 3), colour[None]])
    codec = NaiveCodec((4, 4), palette)
    image = colour.view(1, 3, 1, 1).expand(1, 3, 32, 32)
    rec = codec.reconstruct(image)
    assert torch.equal(to_uint8(rec), to_uint8(image))


def test_thumbnail_sized_image_reproduced_up_to_palette():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 4, 8, generator=g)
    palette = torch.rand(5, 3, generator=g)
    rec = NaiveCodec((4, 8), palette).reconstruct(image)
    # each pixel becomes its nearest palette colour, nothing else changes
    flat = image.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = palette[torch.cdist(flat, palette).argmin(1)]
    assert torch.allclose(rec.permute(0, 2, 3, 1).reshape(-1, 3), nearest)
    # with a palette fitted on the image itself (<= Q distinct colours) it is reproduced exactly
    exact = NaiveCodec((4, 8), fit_palette(flat, 64)).reconstruct(image)
    assert torch.equal(exact, image)


def test_fit_palette_deterministic_and_is_kmeans_fixed_point():
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2000, 3, generator=g)
    a, b = fit_palette(pixels, 16, seed=3), fit_palette(pixels, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (16, 3)
    # quantising with the fitted palette beats quantising with 16 random pixels
    err = lambda p: torch.cdist(pixels, p).min(1).values.pow(2).mean()
    assert err(a) < err(pixels[:16])


def test_floor_codecs_cached_and_bit_matched(tmp_path):
    cfg = get_preset("smoke")
    first = floor_codecs(cfg, tmp_path, images=16)
    files = sorted((tmp_path / "floor_palettes").iterdir())
    assert len(files) == 2  # one palette per codec, written once
    tok = cfg.tokenizer
    assert first["tokenizer"].bits == pytest.approx(
        tok.num_latent_tokens * math.log2(tok.quantizer.codebook_size))
    grid = tok.image_size // cfg.teacher.downsample
    assert first["teacher"].bits == pytest.approx(grid * grid *
                                                  math.log2(cfg.teacher.codebook_size))
    again = floor_codecs(cfg, tmp_path, images=16)
    for name in first:
        assert torch.equal(first[name].palette, again[name].palette)
    # another data seed is another data set: another cache entry
    floor_codecs(override(cfg, {"data.seed": 1}), tmp_path, images=16)
    assert len(list((tmp_path / "floor_palettes").iterdir())) == 4


def test_evaluate_reports_floors_and_ceiling_on_the_same_images():
    x = fake_images(9)
    palette = torch.rand(8, 3, generator=torch.Generator().manual_seed(2))
    bounds = Bounds(floors={"tokenizer": NaiveCodec((2, 2), palette),
                            "teacher": NaiveCodec((4, 4), palette)}, ceiling=True)
    cfg = EvalConfig(decode_steps=(1, 2), trace_steps=0, batch_size=4, seed=0,
                     metrics=("psnr", "ssim"))
    teacher = FakeTeacher()
    r = evaluate(FakeTokenizer(), teacher, batches(x, 5), cfg, progress=False, bounds=bounds)
    x_u8 = to_uint8(x)
    x_q = x_u8.float() / 255
    expected = {"teacher": to_uint8(teacher.decode_ids(teacher.encode_ids(x))),
                "floor_tokenizer": to_uint8(bounds.floors["tokenizer"].reconstruct(x_q)),
                "floor_teacher": to_uint8(bounds.floors["teacher"].reconstruct(x_q))}
    for prefix, rec in expected.items():
        assert r.metrics[f"{prefix}_psnr"] == pytest.approx(psnr(rec, x_u8).mean().item())
        assert r.metrics[f"{prefix}_ssim"] == pytest.approx(ssim(rec, x_u8).mean().item())
    # without bounds nothing of the kind is reported, and the tokenizer's metrics are unchanged
    plain = evaluate(FakeTokenizer(), teacher, batches(x, 5), cfg, progress=False)
    assert not any(k.startswith(("floor_", "teacher_")) for k in plain.metrics)
    assert all(plain.metrics[k] == r.metrics[k] for k in plain.metrics)
