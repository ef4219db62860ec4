"""Training losses.

- `weighted_ce`: the stage-1/2 token loss (DESIGN §1, paper Table 6): cross-entropy against the
  teacher ids M_g at *every* position, weight 1 on masked and `unmasked_weight` (0.1) on visible
  positions, normalised by the sum of weights. Label smoothing 0.
- Hinge GAN and LeCam (stage 3 and optional stage 0): `hinge_d`, `hinge_g`, `LeCamEMA`.
- `load_lpips`: the LPIPS(VGG) perceptual loss when its backbone weights are available locally,
  else None with one warning that says how to provide them (DESIGN §2: never a made-up number).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class CEOutput:
    loss: Tensor  # scalar, the weighted CE (what is optimised)
    ce_sum_masked: Tensor  # scalar, sum of per-position CE over masked positions (detached)
    ce_sum_visible: Tensor  # scalar, same over visible positions (detached)
    num_masked: Tensor  # scalar long; tensors, not ints: reading them back would stall a GPU
    num_visible: Tensor


def weighted_ce(logits: Tensor, targets: Tensor, masked: Tensor,
                unmasked_weight: float = 0.1, label_smoothing: float = 0.0) -> CEOutput:
    """Weighted token cross-entropy.

    logits: B×N×V, targets: B×N long (M_g), masked: B×N bool (True = masked, weight 1; False =
    visible, weight `unmasked_weight`). loss = sum(w·ce) / sum(w). Computed in float32 so that
    bf16/fp16 autocast does not degrade the log-softmax. `label_smoothing`: 0 for the tokenizer
    (DESIGN §1); the class-conditional generator uses 0.1 (released MaskGIT config).
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                         label_smoothing=label_smoothing)
    ce = ce.view_as(targets)
    w = torch.where(masked, torch.ones_like(ce), torch.full_like(ce, unmasked_weight))
    loss = (ce * w).sum() / w.sum()
    d = ce.detach()
    n_masked = masked.sum()
    return CEOutput(loss=loss, ce_sum_masked=(d * masked).sum(), ce_sum_visible=(d * ~masked).sum(),
                    num_masked=n_masked, num_visible=masked.numel() - n_masked)


# --------------------------------------------------------------------------------------------
# Adversarial terms
# --------------------------------------------------------------------------------------------


def hinge_d(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss at the paper's scale (the reference's, and taming's):
    0.5 · (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g(fake_logits: Tensor) -> Tensor:
    """Generator hinge loss: -mean D(G(z))."""
    return -fake_logits.mean()


class LeCamEMA(nn.Module):
    """LeCam regulariser (Tseng et al. 2021) with EMA anchors of the discriminator outputs.

    reg = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x̂))^2). The anchors start at 0
    and move by `decay` per update, as in the reference (its anchors are zero-initialised
    buffers); they are buffers so they are checkpointed with the discriminator (exact resume).
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_logits: Tensor, fake_logits: Tensor) -> None:
        self.ema_real.lerp_(real_logits.float().mean(), 1.0 - self.decay)
        self.ema_fake.lerp_(fake_logits.float().mean(), 1.0 - self.decay)

    @torch.no_grad()
    def advance(self, means: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Move the anchors through a step's micro-batches at once: means G×2 (mean real and
        fake logit of micro-batch j, in order) -> the (ema_real, ema_fake) micro-batch j sees,
        i.e. before its own update, as when `forward` and `update` alternate per micro-batch.
        Several workers pass every rank's means, so all ranks hold the same anchors."""
        out = []
        for real_mean, fake_mean in means.float():
            out.append((self.ema_real.clone(), self.ema_fake.clone()))
            self.ema_real.lerp_(real_mean, 1.0 - self.decay)
            self.ema_fake.lerp_(fake_mean, 1.0 - self.decay)
        return out

    def forward(self, real_logits: Tensor, fake_logits: Tensor,
                anchors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        ema_real, ema_fake = anchors if anchors is not None else (self.ema_real, self.ema_fake)
        return (F.relu(real_logits.float() - ema_fake).pow(2).mean()
                + F.relu(ema_real - fake_logits.float()).pow(2).mean())


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------

VGG_FILE = "vgg16-397923af.pth"  # the torchvision ImageNet VGG16 that lpips builds on


def lpips_backbone_path() -> Path:
    """Where torchvision (and therefore lpips) looks for the VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=2)


def load_lpips(device=None) -> nn.Module | None:
    """LPIPS(VGG) in eval mode with frozen weights, or None (with one warning) if offline.

    lpips ships its own linear heads; the VGG16 backbone comes from torchvision's cache. We never
    trigger a download: if the file is absent the LPIPS term is skipped and the warning names the
    file and the directory to put it in (or set TORCH_HOME).
    """
    path = lpips_backbone_path()
    if not path.exists() and not os.environ.get("SFTOK_ALLOW_DOWNLOADS"):
        warn_once("lpips", f"LPIPS term skipped: VGG16 weights not found at {path}. Put "
                           f"'{VGG_FILE}' (torchvision's ImageNet VGG16) there, or point "
                           f"TORCH_HOME at a cache that has it, to enable the LPIPS loss.")
        return None
    try:
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 'pretrained' deprecation chatter
            model = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as e:  # noqa: BLE001 (any failure means: no LPIPS term, said once)
        warn_once("lpips", f"LPIPS term skipped: could not build LPIPS(VGG): {e}")
        return None
    model.requires_grad_(False).eval()
    return model.to(device) if device is not None else model


def lpips_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean LPIPS between images in [0, 1] (lpips expects [-1, 1])."""
    return model(x.float() * 2 - 1, y.float() * 2 - 1).mean()
