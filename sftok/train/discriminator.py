"""Discriminators for the adversarial terms (stage 3, optional stage 0).

- `PatchGAN`: a small convolutional patch discriminator (pix2pix / taming style, GroupNorm
  instead of BatchNorm so its output does not depend on the batch); needs no pretrained weights.
- `DinoDiscriminator`: the paper's "dinodisc" (Table 6): a frozen DINO ViT-S/16 (timm
  `vit_small_patch16_224.dino`) read at the patch embedding and blocks 2/5/8/11, each read-out
  with a spectral-normalised, virtual-batch-normed head producing per-token logits; its inputs
  (real and fake) pass through `diff_augment` first. Its backbone weights must exist locally;
  otherwise `build_discriminator` falls back to PatchGAN with one warning naming the file.
- `Adversary`: a discriminator with its optimiser, learning-rate schedule, hinge loss and LeCam.

Both discriminators take images in [0, 1] (B×3×H×W) and return logits (any shape; the hinge
loss averages).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sftok.train.dino_discriminator import (
    DINO_REPO,
    DinoDiscriminator,
    diff_augment,
    find_dino_weights,
)
from sftok.train.loop import clip_and_step_async
from sftok.train.losses import LeCamEMA, hinge_d, hinge_g, warn_once
from sftok.train.optim import build_optimizer, lr_at, set_lr


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


DINO_MISSING = ("DINO discriminator unavailable: its frozen ViT-S/16 weights were not found. "
                "Provide a local file via SFTOK_DINO_WEIGHTS=FILE (timm "
                f"'vit_small_patch16_224.dino' model.safetensors from {DINO_REPO}, or the DINO "
                "release's dino_deitsmall16_pretrain.pth), or cache that Hugging Face repo; "
                "falling back to a PatchGAN discriminator.")


def build_discriminator(kind: str, image_size: int) -> nn.Module:
    """"patchgan" or "dino" (falls back to PatchGAN, with one warning, without local weights)."""
    if kind == "dino":
        weights = find_dino_weights()
        if weights is None:
            warn_once("dino", DINO_MISSING)
            return PatchGAN(image_size)
        try:
            return DinoDiscriminator(weights)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            warn_once("dino", f"DINO discriminator unavailable: could not load {weights} ({e}); "
                              "using PatchGAN")
            return PatchGAN(image_size)
    if kind == "patchgan":
        return PatchGAN(image_size)
    raise ValueError(f"unknown discriminator {kind!r} (known: patchgan, dino)")


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# The adversary: discriminator + its optimiser, hinge losses, LeCam
# --------------------------------------------------------------------------------------------


def discriminator_lr(step: int, start: int, total_steps: int, cfg) -> float:
    """The discriminator's learning rate at optimiser step `step`: 0 before `start` (gan_start),
    then the stage's schedule (`optim.lr_at`: warm-up, cosine to end_lr) restarted at `start`
    over the remaining `total_steps - start` steps -- the reference steps its discriminator
    scheduler only once the discriminator trains."""
    if step < start:
        return 0.0
    return lr_at(step - start, max(1, total_steps - start), cfg)


class Adversary:
    """A discriminator with its own AdamW, learning-rate schedule, grad scaler and LeCam anchors.

    Used in two phases per optimiser step (DESIGN §1 stage 3):
    1. `generator_loss(fake)` inside the generator's update, with the discriminator's trainable
       parameters frozen (requires_grad False) so the generator's backward leaves no gradient in
       them (the reference leaks it; DESIGN says do not copy that);
    2. `update(reals, fakes, lr)` on detached fakes: 0.5·hinge + lecam_weight · LeCam, at
       `lr_at(step)` (its own schedule, warming up from `start`).
    The DINO discriminator sees `diff_augment`ed images in both phases, real and fake alike
    (random draws from `generator`, the stage's, so a resumed run draws the same).
    """

    def __init__(self, kind: str, image_size: int, optim_cfg, device: torch.device,
                 precision, lecam_weight: float = 0.0, start: int = 0,
                 total_steps: int | None = None, generator: torch.Generator | None = None):
        self.disc = build_discriminator(kind, image_size).to(device)
        self.augment = isinstance(self.disc, DinoDiscriminator)  # as the reference: dino only
        self.generator = generator
        self.params = trainable_parameters(self.disc)
        self.optimizer = build_optimizer([{"params": self.params,
                                           "weight_decay": optim_cfg.weight_decay}],
                                         optim_cfg, device)
        self.lecam = LeCamEMA().to(device)
        self.lecam_weight = lecam_weight
        self.precision = precision
        self.scaler = precision.scaler()
        self.optim_cfg, self.start, self.total_steps = optim_cfg, start, total_steps
        self.grad_clip = optim_cfg.grad_clip

    def modules(self) -> dict[str, nn.Module]:
        return {"discriminator": self.disc, "lecam": self.lecam}

    def lr_at(self, step: int) -> float:
        """`discriminator_lr` for this adversary's start and the stage's length."""
        total = self.total_steps if self.total_steps is not None else step + 1
        return discriminator_lr(step, self.start, total, self.optim_cfg)

    def logits(self, images: Tensor) -> Tensor:
        """D(augment(images)) as float32 logits."""
        if self.augment:
            return self.disc(diff_augment(images, self.generator), self.generator).float()
        return self.disc(images).float()

    def _set_trainable(self, flag: bool) -> None:
        for p in self.params:
            p.requires_grad_(flag)

    def generator_loss(self, fake: Tensor) -> Tensor:
        """-mean D(fake), differentiable w.r.t. `fake` only."""
        self._set_trainable(False)
        try:
            return hinge_g(self.logits(fake))
        finally:
            # requires_grad is read when the graph is built, so re-enabling it now does not
            # route the generator's backward into the discriminator's parameters.
            self._set_trainable(True)

    # The metrics `update` returns that must stay finite (the caller's `finite_keys`; the grad
    # norm only without a loss scaler, which skips inf steps by design).
    FINITE_KEYS = ("gan_d", "lecam")

    def update(self, reals: list[Tensor], fakes: list[Tensor],
               lr: float) -> dict[str, Tensor | float]:
        """One discriminator optimiser step over micro-batches (reals[i], fakes[i] detached).

        No host sync: gan_d, lecam, logits_real / _fake and disc_grad_norm are 0-dim device
        tensors; the caller lists `FINITE_KEYS` (+ disc_grad_norm) in its `finite_keys`.
        """
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        n = len(reals)
        out: dict[str, Tensor | float] = {}
        for real, fake in zip(reals, fakes):
            with self.precision.autocast():
                lr_real = self.logits(real)
                lr_fake = self.logits(fake.detach())
            d = hinge_d(lr_real, lr_fake)
            reg = self.lecam(lr_real, lr_fake)
            loss = d + self.lecam_weight * reg
            self.scaler.scale(loss / n).backward()
            self.lecam.update(lr_real.detach(), lr_fake.detach())
            for k, v in (("gan_d", d), ("lecam", reg), ("logits_real", lr_real.mean()),
                         ("logits_fake", lr_fake.mean())):
                out[k] = out.get(k, 0.0) + v.detach().float() / n
        out["disc_grad_norm"] = clip_and_step_async(self.optimizer, self.scaler, self.params,
                                                    self.grad_clip)
        out["disc_lr"] = lr
        return out
