"""Discriminators for the adversarial terms (stage 3, optional stage 0).

- `PatchGAN`: a small convolutional patch discriminator (pix2pix / taming style, GroupNorm
  instead of BatchNorm so its output does not depend on the batch); needs no pretrained weights.
- `DinoDiscriminator`: frozen DINO ViT-S/16 features (timm `vit_small_patch16_224.dino`) from a
  few blocks, each with a small trainable head producing per-token logits (StyleGAN-T style; the
  paper's stage 3 uses a DINO discriminator, Table 6). Its backbone weights must exist locally;
  otherwise `build_discriminator` falls back to PatchGAN with one warning (issue 3).

Both take images in [0, 1] (B×3×H×W) and return logits (any shape; the hinge loss averages).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sftok.train.losses import warn_once

DINO_REPO = "timm/vit_small_patch16_224.dino"


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 4 else 1, ch)


class PatchGAN(nn.Module):
    """Conv(4, s2) stack -> 1-channel patch logits. Depth adapts to the image size."""

    def __init__(self, image_size: int, base: int = 64, max_layers: int = 3):
        super().__init__()
        # 16 px -> 1 strided layer, 32 -> 2, >= 64 -> 3 (keeps >= 2x2 output patches).
        n = max(1, min(max_layers, int(math.log2(image_size)) - 3))
        layers: list[nn.Module] = [nn.Conv2d(3, base, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base
        for i in range(1, n):
            nxt = min(base * 2 ** i, base * 8)
            layers += [nn.Conv2d(ch, nxt, 4, 2, 1, bias=False), _gn(nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        nxt = min(ch * 2, base * 8)
        layers += [nn.Conv2d(ch, nxt, 4, 1, 1, bias=False), _gn(nxt), nn.LeakyReLU(0.2),
                   nn.Conv2d(nxt, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        """images B×3×H×W in [0, 1] -> logits B×1×h×w."""
        return self.net(images * 2 - 1)


class _Head(nn.Module):
    """Per-token head on a B×L×D feature map: conv1d blocks -> B×L logits."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(dim, hidden, 1), nn.LeakyReLU(0.2),
            nn.Conv1d(hidden, hidden, 9, padding=4, padding_mode="circular"), _gn(hidden),
            nn.LeakyReLU(0.2), nn.Conv1d(hidden, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.transpose(1, 2)).squeeze(1)


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT-S/16 backbone + trainable heads on blocks `taps`.

    The backbone is frozen (requires_grad False, eval) and is never in an optimiser; gradients
    still flow *through* it to a generated image during the generator update.
    """

    def __init__(self, weights: Path, taps: tuple[int, ...] = (2, 5, 8, 11)):
        super().__init__()
        import timm

        self.backbone = timm.create_model(
            "vit_small_patch16_224.dino", pretrained=True, num_classes=0,
            pretrained_cfg_overlay={"file": str(weights)})
        self.backbone.requires_grad_(False).eval()
        self.taps = taps
        dim = self.backbone.embed_dim
        self.heads = nn.ModuleList(_Head(dim) for _ in taps)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()  # frozen features: never in train mode
        return self

    def forward(self, images: Tensor) -> Tensor:
        """images B×3×H×W in [0, 1] -> logits B×(len(taps)·L)."""
        x = F.interpolate(images, size=224, mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        bb = self.backbone
        x = bb.patch_embed(x)
        x = bb._pos_embed(x)
        x = bb.norm_pre(x)
        outs = []
        for i, block in enumerate(bb.blocks):
            x = block(x)
            if i in self.taps:
                outs.append(self.heads[self.taps.index(i)](x))
            if i >= max(self.taps):
                break
        return torch.cat(outs, dim=1)


def find_dino_weights() -> Path | None:
    """Local DINO ViT-S/16 weights: $SFTOK_DINO_WEIGHTS, else the Hugging Face cache."""
    env = os.environ.get("SFTOK_DINO_WEIGHTS")
    if env and Path(env).exists():
        return Path(env)
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(DINO_REPO, name)
            if isinstance(hit, str):
                return Path(hit)
    except Exception:  # noqa: BLE001 (no hub, no cache: treat as absent)
        return None
    return None


def build_discriminator(kind: str, image_size: int) -> nn.Module:
    """"patchgan" or "dino" (falls back to PatchGAN, with a warning, without local weights)."""
    if kind == "dino":
        weights = find_dino_weights()
        if weights is not None:
            try:
                return DinoDiscriminator(weights)
            except Exception as e:  # noqa: BLE001
                warn_once("dino", f"DINO discriminator unavailable ({e}); using PatchGAN")
                return PatchGAN(image_size)
        warn_once("dino", "DINO discriminator weights not found (set SFTOK_DINO_WEIGHTS to a "
                          f"local 'vit_small_patch16_224.dino' file or cache the Hugging Face "
                          f"repo {DINO_REPO}); falling back to a PatchGAN discriminator.")
        return PatchGAN(image_size)
    if kind == "patchgan":
        return PatchGAN(image_size)
    raise ValueError(f"unknown discriminator {kind!r} (known: patchgan, dino)")


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# The adversary: discriminator + its optimiser, hinge losses, LeCam
# --------------------------------------------------------------------------------------------


class Adversary:
    """A discriminator with its own AdamW, grad scaler and LeCam anchors.

    Used in two phases per optimiser step (DESIGN §1 stage 3):
    1. `generator_loss(fake)` inside the generator's update, with the discriminator's trainable
       parameters frozen (requires_grad False) so the generator's backward leaves no gradient in
       them (the reference leaks it; DESIGN says do not copy that);
    2. `update(reals, fakes, lr)` on detached fakes: hinge loss + lecam_weight · LeCam.
    """

    def __init__(self, kind: str, image_size: int, optim_cfg, device: torch.device,
                 precision, lecam_weight: float = 0.0):
        from sftok.train.losses import LeCamEMA
        from sftok.train.optim import build_optimizer

        self.disc = build_discriminator(kind, image_size).to(device)
        self.params = trainable_parameters(self.disc)
        self.optimizer = build_optimizer([{"params": self.params,
                                           "weight_decay": optim_cfg.weight_decay}],
                                         optim_cfg, device)
        self.lecam = LeCamEMA().to(device)
        self.lecam_weight = lecam_weight
        self.precision = precision
        self.scaler = precision.scaler()
        self.grad_clip = optim_cfg.grad_clip

    def modules(self) -> dict[str, nn.Module]:
        return {"discriminator": self.disc, "lecam": self.lecam}

    def _set_trainable(self, flag: bool) -> None:
        for p in self.params:
            p.requires_grad_(flag)

    def generator_loss(self, fake: Tensor) -> Tensor:
        """-mean D(fake), differentiable w.r.t. `fake` only."""
        from sftok.train.losses import hinge_g

        self._set_trainable(False)
        try:
            return hinge_g(self.disc(fake).float())
        finally:
            # requires_grad is read when the graph is built, so re-enabling it now does not
            # route the generator's backward into the discriminator's parameters.
            self._set_trainable(True)

    def update(self, reals: list[Tensor], fakes: list[Tensor], lr: float) -> dict[str, float]:
        """One discriminator optimiser step over micro-batches (reals[i], fakes[i] detached)."""
        from sftok.train.loop import check_finite, clip_and_step, scalar
        from sftok.train.losses import hinge_d
        from sftok.train.optim import set_lr

        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        n = len(reals)
        d_total, lecam_total = 0.0, 0.0
        for real, fake in zip(reals, fakes):
            with self.precision.autocast():
                lr_real = self.disc(real).float()
                lr_fake = self.disc(fake.detach()).float()
            d = hinge_d(lr_real, lr_fake)
            reg = self.lecam(lr_real, lr_fake)
            loss = d + self.lecam_weight * reg
            check_finite("discriminator loss", loss)
            self.scaler.scale(loss / n).backward()
            self.lecam.update(lr_real.detach(), lr_fake.detach())
            d_total += scalar(d) / n
            lecam_total += scalar(reg) / n
        clip_and_step(self.optimizer, self.scaler, self.params, self.grad_clip)
        return {"gan_d": d_total, "lecam": lecam_total}
