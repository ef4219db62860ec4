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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sftok.distributed import SINGLE, Workers
from sftok.train.dino_discriminator import (
    DINO_REPO,
    DinoDiscriminator,
    augment_draws,
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


@dataclass
class Views:
    """The random numbers of one discriminator call on a batch (DINO: DiffAugment's 7×B
    uniforms, then the 224-px view's 3 or None), drawn ahead of the step (`Adversary.draws`)."""

    augment: Tensor
    view: Tensor | None


class Adversary:
    """A discriminator with its own AdamW, learning-rate schedule, grad scaler and LeCam anchors.

    Used in two phases per optimiser step (DESIGN §1 stage 3):
    1. `generator_loss(fake)` inside the generator's update, with the discriminator's trainable
       parameters frozen (requires_grad False) so the generator's backward leaves no gradient in
       them (the reference leaks it; DESIGN says do not copy that);
    2. `update(reals, fakes, lr)` on detached fakes: 0.5·hinge + lecam_weight · LeCam, at
       `lr_at(step)` (its own schedule, warming up from `start`).
    The DINO discriminator sees `diff_augment`ed images in both phases, real and fake alike
    (random draws from `generator`, the stage's, so a resumed run draws the same; a stage draws
    them ahead of its step with `draws` so that every rank draws them for every micro-batch).

    Several workers: the discriminator is not wrapped in DDP. Micro-batch j's LeCam term uses
    the anchors after micro-batches 0..j-1 of every rank, so `update` first computes all the
    logits of its micro-batches, gathers every rank's logit means, moves the anchors through
    them in the one-process order, then takes the losses' backward passes and averages the
    gradients over ranks in one all-reduce (DDP allows one forward per backward). Its buffers
    (spectral-norm power iterations of the DINO heads) are then broadcast from rank 0.
    """

    def __init__(self, kind: str, image_size: int, optim_cfg, device: torch.device,
                 precision, lecam_weight: float = 0.0, start: int = 0,
                 total_steps: int | None = None, generator: torch.Generator | None = None,
                 workers: Workers = SINGLE):
        self.disc = build_discriminator(kind, image_size).to(device)
        self.augment = isinstance(self.disc, DinoDiscriminator)  # as the reference: dino only
        self.image_size = image_size
        self.generator = generator
        self.workers = workers
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

    def draws(self, batch: int) -> Views | None:
        """The random numbers of one call on `batch` images, from the stage's generator (None:
        this discriminator draws none)."""
        if not self.augment:
            return None
        aug = augment_draws(batch, self.generator)
        return Views(aug, DinoDiscriminator.view_draws(self.image_size, self.generator))

    def logits(self, images: Tensor, views: Views | None = None) -> Tensor:
        """D(augment(images)) as float32 logits (views: drawn ahead; None: drawn now)."""
        if self.augment:
            if views is None:
                views = self.draws(images.shape[0])
            return self.disc(diff_augment(images, draws=views.augment), view=views.view).float()
        return self.disc(images).float()

    def _set_trainable(self, flag: bool) -> None:
        for p in self.params:
            p.requires_grad_(flag)

    def generator_loss(self, fake: Tensor, views: Views | None = None) -> Tensor:
        """-mean D(fake), differentiable w.r.t. `fake` only."""
        self._set_trainable(False)
        try:
            return hinge_g(self.logits(fake, views))
        finally:
            # requires_grad is read when the graph is built, so re-enabling it now does not
            # route the generator's backward into the discriminator's parameters.
            self._set_trainable(True)

    # The metrics `update` returns that must stay finite (the caller's `finite_keys`; the grad
    # norm only without a loss scaler, which skips inf steps by design).
    FINITE_KEYS = ("gan_d", "lecam")

    def update(self, reals: list[Tensor], fakes: list[Tensor], lr: float,
               views: list[tuple[Views | None, Views | None]] | None = None
               ) -> dict[str, Tensor | float]:
        """One discriminator optimiser step over this rank's micro-batches (reals[i], fakes[i]
        detached; views[i]: their (real, fake) draws, None: drawn now). See the class docstring
        for W > 1.

        No host sync: gan_d, lecam, logits_real / _fake and disc_grad_norm are 0-dim device
        tensors; the caller lists `FINITE_KEYS` (+ disc_grad_norm) in its `finite_keys`.
        """
        workers = self.workers
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        n = len(reals)
        views = views or [(None, None)] * n
        pairs = []
        for real, fake, (v_real, v_fake) in zip(reals, fakes, views):
            with self.precision.autocast():
                pairs.append((self.logits(real, v_real), self.logits(fake.detach(), v_fake)))
        means = torch.stack([torch.stack([r.detach().float().mean(), f.detach().float().mean()])
                             for r, f in pairs])  # n×2, this rank's micro-batches
        # Every micro-batch j = a·W + r of the step, in the one-process order (n·W)×2.
        means = torch.stack(workers.all_gather(means), 1).reshape(-1, 2)
        anchors = self.lecam.advance(means)
        out = {"gan_d": 0.0, "lecam": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        for j, (lr_real, lr_fake) in zip(workers.micro_indices(n), pairs):
            d = hinge_d(lr_real, lr_fake)
            reg = self.lecam(lr_real, lr_fake, anchors[j])
            loss = d + self.lecam_weight * reg
            self.scaler.scale(loss / n).backward()
            for k, v in (("gan_d", d), ("lecam", reg), ("logits_real", lr_real.mean()),
                         ("logits_fake", lr_fake.mean())):
                out[k] = out[k] + v.detach().float() / n
        workers.average_gradients(self.params)
        out["disc_grad_norm"] = clip_and_step_async(self.optimizer, self.scaler, self.params,
                                                    self.grad_clip)
        if workers.distributed:  # power-iteration vectors: rank 0's on every rank
            for buf in self.disc.buffers():
                buf.copy_(workers.broadcast_tensor(buf))
        out["disc_lr"] = lr
        return out
