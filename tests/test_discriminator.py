"""The paper's DINO discriminator (Table 6 "dinodisc") and the adversary's schedule: shapes,
spectral norm, virtual batch norm, DiffAugment on real and fake, the discriminator's learning
rate. The backbone runs on random weights (pretrained weights are never downloaded)."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from sftok.config import OptimConfig
from sftok.train import dino_discriminator, discriminator, losses
from sftok.train.dino_discriminator import (
    DINO_TAPS,
    DinoDiscriminator,
    VirtualBatchNorm1d,
    _Head,
    diff_augment,
)
from sftok.train.loop import Precision

CPU = torch.device("cpu")


def _tiny_backbone(weights):
    """A 12-block ViT/16 at 224 like DINO ViT-S/16 but 32 wide (fast; the real width is tested
    by the slow test)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=12, num_heads=2,
                             num_classes=0).requires_grad_(False).eval()


@pytest.fixture(scope="module")
def dino() -> DinoDiscriminator:
    mp = pytest.MonkeyPatch()
    mp.setattr(dino_discriminator, "load_dino_backbone", _tiny_backbone)
    torch.manual_seed(0)
    try:
        return DinoDiscriminator(weights=None)
    finally:
        mp.undo()


@pytest.mark.slow
def test_dino_vit_s16_on_random_weights():
    torch.manual_seed(0)
    d = DinoDiscriminator(weights=None)  # the real ViT-S/16, random weights
    assert d.backbone.embed_dim == 384 and len(d.backbone.blocks) == 12
    reads = d.readouts(torch.rand(2, 3, 32, 32))
    assert [tuple(r.shape) for r in reads] == [(2, 384, 196)] * 5
    assert d(torch.rand(2, 3, 32, 32)).shape == (2, 5 * 196)


def test_dino_discriminator_shapes_and_frozen_backbone(dino):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    reads = dino.readouts(images)
    # patch embedding + blocks 2, 5, 8, 11; each B×D×196 (patch tokens + class token)
    assert len(reads) == len(DINO_TAPS) + 1 == len(dino.heads) == 5
    assert all(r.shape == (2, 32, 196) and r.dtype == torch.float32 for r in reads)
    logits = dino(images)
    assert logits.shape == (2, 5 * 196)
    assert not any(p.requires_grad for p in dino.backbone.parameters())
    assert {n.split(".")[0] for n, p in dino.named_parameters() if p.requires_grad} == {"heads"}
    logits.mean().backward()  # gradients flow through the frozen backbone to the image
    assert images.grad is not None and images.grad.abs().sum() > 0
    dino.train()
    assert not dino.backbone.training and dino.heads.training


def test_dino_resizes_larger_images_by_crop_or_area(dino):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    shapes = {tuple(dino._resize(x, g).shape) for _ in range(8)}
    assert shapes == {(1, 3, 224, 224)}


def test_heads_are_spectrally_normalised():
    torch.manual_seed(0)
    head = _Head(dim=16, virtual_batch=8)
    convs = [head.inp[0], head.res[0], head.out]
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    x = torch.randn(8, 16, 12)
    for _ in range(40):  # one power iteration per training forward
        head(x)
    head.eval()
    for c in convs:
        w = c.weight.reshape(c.weight.shape[0], -1)
        assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=0.02)
    assert head(x).shape == (8, 12)


def test_virtual_batch_norm_uses_groups_of_images():
    bn = VirtualBatchNorm1d(4, virtual_batch=8)
    x = torch.randn(16, 4, 10)
    y = bn(x)
    # statistics per group of 8 images: zero mean / unit variance over (images, tokens)
    for g in (y[:8], y[8:]):
        assert torch.allclose(g.mean(dim=(0, 2)), torch.zeros(4), atol=1e-5)
        assert torch.allclose(g.var(dim=(0, 2), unbiased=False), torch.ones(4), atol=1e-3)
    x2 = x.clone()
    x2[15] += 5.0  # another group's image does not change the first group's outputs
    assert torch.equal(bn(x2)[:8], y[:8]) and not torch.equal(bn(x2)[8:], y[8:])


def test_diff_augment_is_seeded_differentiable_and_changes_images():
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    a = diff_augment(x, torch.Generator().manual_seed(3))
    b = diff_augment(x, torch.Generator().manual_seed(3))
    c = diff_augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # cutout (applied last) leaves a zero square of side 0.2·32 ≈ 6 (clipped at the border)
    assert all((img == 0).all(0).sum() >= 3 * 3 for img in a.detach())


def _dino_adversary(monkeypatch, **kw):
    """An Adversary of kind 'dino' with a small random backbone."""
    monkeypatch.setattr(discriminator, "find_dino_weights", lambda: "unused")
    monkeypatch.setattr(dino_discriminator, "load_dino_backbone", _tiny_backbone)
    torch.manual_seed(0)
    return discriminator.Adversary("dino", 32, OptimConfig(), CPU, Precision("fp32", CPU),
                                   lecam_weight=0.001, generator=torch.Generator(), **kw)


def test_augmentation_is_applied_to_real_and_fake(monkeypatch):
    adv = _dino_adversary(monkeypatch)
    assert isinstance(adv.disc, DinoDiscriminator) and adv.augment
    seen = []

    def recording(x, generator=None, **kw):
        seen.append(x)
        return diff_augment(x, generator, **kw)

    monkeypatch.setattr(discriminator, "diff_augment", recording)
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    adv.generator_loss(fake)
    assert len(seen) == 1 and seen[0] is fake
    seen.clear()
    out = adv.update([real], [fake.detach()], lr=1e-4)
    assert len(seen) == 2 and seen[0] is real and torch.equal(seen[1], fake.detach())
    assert {"gan_d", "lecam", "logits_real", "logits_fake", "disc_lr"} <= set(out)


def test_patchgan_adversary_does_not_augment():
    adv = discriminator.Adversary("patchgan", 16, OptimConfig(), CPU, Precision("fp32", CPU))
    assert not adv.augment


def test_dino_missing_weights_message(monkeypatch):
    monkeypatch.setattr(discriminator, "find_dino_weights", lambda: None)
    monkeypatch.setattr(losses, "_warned", set())
    with pytest.warns(UserWarning, match="SFTOK_DINO_WEIGHTS"):
        d = discriminator.build_discriminator("dino", 32)
    assert isinstance(d, discriminator.PatchGAN)


def test_discriminator_lr_is_zero_before_gan_start_and_warms_up_after():
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, end_lr=1e-4)
    lrs = [discriminator.discriminator_lr(s, start=10, total_steps=50, cfg=cfg)
           for s in range(50)]
    assert lrs[:10] == [0.0] * 10
    assert lrs[10:14] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # warm-up from gan_start
    assert lrs[14] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=0.05)
    adv = discriminator.Adversary("patchgan", 16, cfg, CPU, Precision("fp32", CPU), start=10,
                                  total_steps=50)
    assert [adv.lr_at(s) for s in (0, 9, 10, 13)] == pytest.approx([0, 0, 2.5e-4, 1e-3])
