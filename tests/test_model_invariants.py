"""Model invariants: gradients, the frozen teacher, batch independence, decoding via SFTok,
checkpoint round trips, teacher weight loading."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sftok.checkpoint import load_model, save_model
from sftok.config import DecodeConfig, proxy_grid
from sftok.presets import get_preset
from sftok.teacher import Conv2dSame, FrozenTeacher, MaskGitVQGAN, load_teacher_weights
from sftok.tokenizer import SFTok


@pytest.fixture(scope="module")
def smoke():
    return get_preset("smoke")


def _tok(cfg, finetune=False, seed=0) -> SFTok:
    torch.manual_seed(seed)
    tok_cfg = dataclasses.replace(cfg.tokenizer, finetune_decoder=finetune)
    return SFTok(tok_cfg, cfg.teacher.codebook_size, proxy_grid(cfg), cfg.teacher)


def _teacher(cfg, seed=1) -> FrozenTeacher:
    torch.manual_seed(seed)
    return FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size)


def _images(cfg, b=3, seed=2):
    s = cfg.tokenizer.image_size
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def test_training_step_gradients(smoke):
    """Straight-through: the decoder CE reaches the encoder (and its latent queries); the frozen
    teacher that made the targets gets nothing and is not among the tokenizer's parameters."""
    tok, teacher = _tok(smoke).train(), _teacher(smoke)
    images = _images(smoke)
    targets = teacher.encode_ids(images)  # B×N
    assert not targets.requires_grad
    masked = torch.rand(targets.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    proxy = torch.where(masked, torch.full_like(targets, tok.mask_id), targets)
    logits, q = tok(images, proxy)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + q.loss
    loss.backward()
    for name in ("patch_embed.weight", "latent_tokens", "transformer.0.attn.in_proj_weight"):
        g = tok.encoder.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert tok.quantize.embedding.grad.abs().sum() > 0  # codebook loss
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in tok.parameters()}


def test_teacher_stays_frozen(smoke):
    teacher = _teacher(smoke)
    teacher.train()
    teacher.requires_grad_(True)
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.model.train()  # even flipping the inner model is undone on the next call
    teacher.encode_ids(_images(smoke, b=1))
    assert not teacher.model.training
    ids = teacher.encode_ids(_images(smoke))
    assert ids.shape == (3, teacher.grid ** 2) and ids.max() < teacher.codebook_size
    px = teacher.decode_ids(ids)
    assert px.shape == (3, 3, 16, 16) and px.min() >= 0 and px.max() <= 1
    assert teacher.codebook().shape == (smoke.teacher.codebook_size, smoke.teacher.z_channels)


def test_nearest_ids_independent_of_batch(smoke):
    tok = _tok(smoke).eval()
    assert tok.cfg.quantizer.assign_at_inference == "nearest"
    images = _images(smoke, b=4)
    with torch.no_grad():
        together = tok.encode(images).ids
        alone = torch.cat([tok.encode(images[i:i + 1]).ids for i in range(4)])
    assert torch.equal(together, alone)


def test_generate_fixes_each_position_once_and_is_seeded(smoke):
    tok = _tok(smoke).eval()
    with torch.no_grad():
        z_q = tok.encode(_images(smoke)).z_q
    cfg = DecodeConfig(steps=4, temperature=1.0, confidence_noise=1.0)
    a = tok.generate(z_q, cfg, generator=torch.Generator().manual_seed(7), trace=True)
    b = tok.generate(z_q, cfg, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.ids, b.ids)
    assert (a.ids < tok.num_codes).all() and a.last_logits.shape == (3, 64, tok.num_codes)
    fixed = torch.stack([s.fixed_now for s in a.trace]).sum(0)
    assert (fixed == 1).all()


def test_reconstruct_both_pixel_paths(smoke):
    teacher, images = _teacher(smoke), _images(smoke, b=2)
    cfg = DecodeConfig(steps=2)
    for finetune in (False, True):
        tok = _tok(smoke, finetune=finetune).eval()
        px = tok.reconstruct(images, teacher, cfg)
        assert px.shape == images.shape and px.min() >= 0 and px.max() <= 1
    with pytest.raises(ValueError, match="teacher"):
        _tok(smoke).reconstruct(images, None, cfg)


def test_checkpoint_round_trip(smoke, tmp_path):
    tok = _tok(smoke, finetune=True, seed=3).eval()
    cfg_saved = dataclasses.replace(smoke, tokenizer=tok.cfg)
    save_model(tmp_path / "tok", tok, cfg_saved)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json",
                                                                    "model.safetensors"]
    loaded, cfg = load_model(tmp_path / "tok")
    assert cfg == cfg_saved and isinstance(loaded, SFTok) and loaded.cfg == tok.cfg
    sd, sd2 = tok.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    images = _images(smoke, b=2)
    with torch.no_grad():
        assert torch.equal(tok.encode(images).ids, loaded.eval().encode(images).ids)
    # The teacher is never in a tokenizer checkpoint: only the tokenizer's own tensors.
    teacher_keys = set(_teacher(smoke).model.state_dict())
    assert not teacher_keys & set(sd2)
    assert all(k.split(".")[0] in {"encoder", "quantize", "decoder", "pixel_quantize",
                                   "pixel_decoder"} for k in sd2)


def test_teacher_checkpoint_round_trip(smoke, tmp_path):
    teacher = _teacher(smoke)
    save_model(tmp_path / "t", teacher, smoke)
    loaded, _ = load_model(tmp_path / "t")
    assert isinstance(loaded, FrozenTeacher) and loaded.grid == teacher.grid
    images = _images(smoke)
    assert torch.equal(loaded.encode_ids(images), teacher.encode_ids(images))


def test_load_teacher_weights_from_bin_and_errors(smoke, tmp_path):
    src = _teacher(smoke, seed=4).model
    torch.save(src.state_dict(), tmp_path / "w.bin")
    dst = MaskGitVQGAN(smoke.teacher)
    load_teacher_weights(dst, tmp_path / "w.bin")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                 dst.state_dict().values()))
    sd = src.state_dict()
    missing = {k: v for k, v in sd.items() if k != "quantize.embedding.weight"}
    with pytest.raises(ValueError, match="missing keys: quantize.embedding.weight"):
        load_teacher_weights(dst, missing)
    wrong = dict(sd, **{"decoder.conv_in.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"decoder.conv_in.bias: file \(7,\)"):
        load_teacher_weights(dst, wrong)
    with pytest.raises(FileNotFoundError):
        load_teacher_weights(dst, tmp_path / "nope.bin")


def test_conv2d_same_pads_right_and_bottom():
    """TF "same" padding puts the odd extra pixel on the right/bottom (golden README item 7)."""
    conv = Conv2dSame(1, 1, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.arange(9.0).view(1, 1, 3, 3)
    y = conv(x)
    assert y.shape == x.shape
    assert torch.equal(y[0, 0], torch.tensor([[8.0, 12, 7], [20, 24, 13], [13, 15, 8]]))
