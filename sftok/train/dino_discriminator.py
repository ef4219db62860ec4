"""The paper's DINO discriminator ("dinodisc", Table 6; StyleGAN-T style) and its DiffAugment.

Facts from the authors' released code (read, not copied): a frozen DINO ViT-S/16 read at the
patch embedding and after blocks 2, 5, 8, 11 (read-out = patch tokens + class token); one head
per read-out: spectral-normalised 1x1 conv -> batch norm over virtual batches of 8 -> LeakyReLU
0.2, a residual block of the same with a circular k=9 conv (sum scaled by 1/sqrt 2), and a
spectral-normalised 1x1 conv to one logit per token; DiffAugment (translation 1/8, colour,
cutout 0.2, each always on) on real and fake inputs. The backbone's weights come from a local
file only (`find_dino_weights`); tests build it on random weights.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DINO_REPO = "timm/vit_small_patch16_224.dino"

DINO_SIZE = 224  # the backbone's input side (16x16 patches -> 14x14 = 196 tokens)
DINO_TAPS = (2, 5, 8, 11)  # blocks read besides the patch embedding (reference key_depths)
VIRTUAL_BATCH = 8  # batch-norm statistics over groups of this many images (reference)
HEAD_KERNEL = 9  # the residual conv's width over the token sequence (reference ks)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Uniforms drawn on the generator's device (CPU by default), moved to `device` (without
    waiting for the GPU's queued kernels)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gdev).to(device, non_blocking=True)


def diff_augment(x: Tensor, generator: torch.Generator | None = None,
                 translation: float = 0.125, cutout: float = 0.2) -> Tensor:
    """DiffAugment (Zhao et al. 2020) as the paper's DINO discriminator uses it, on real and
    fake images alike: per image, a translation by up to `translation` of the side (zero fill),
    colour (brightness ±0.5, saturation ×[0, 2], contrast ×[0.5, 1.5]) and one square cutout of
    side `cutout`·H. Differentiable in x. x B×3×H×W (float) -> B×3×H×W.
    """
    x = x.float()
    b, _, h, w = x.shape
    u = _uniform((7, b), generator, x.device)
    # translation: read the image shifted by (ty, tx) from a 1-pixel zero border
    dh, dw = round(h * translation), round(w * translation)
    ty = (u[0] * (2 * dh + 1)).floor().long() - dh
    tx = (u[1] * (2 * dw + 1)).floor().long() - dw
    iy = (torch.arange(h, device=x.device)[None] + ty[:, None] + 1).clamp(0, h + 1)  # B×H
    ix = (torch.arange(w, device=x.device)[None] + tx[:, None] + 1).clamp(0, w + 1)  # B×W
    padded = F.pad(x, (1, 1, 1, 1))
    bi = torch.arange(b, device=x.device)[:, None, None]
    x = padded[bi, :, iy[:, :, None], ix[:, None, :]].permute(0, 3, 1, 2)  # B×H×W×3 -> B×3×H×W
    # colour
    x = x + (u[2] - 0.5).view(b, 1, 1, 1)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (2 * u[3]).view(b, 1, 1, 1) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * (u[4] + 0.5).view(b, 1, 1, 1) + m
    # cutout: a ch×cw square centred at a uniform position (clipped at the border)
    ch, cw = round(h * cutout), round(w * cutout)
    cy = (u[5] * (h + 1 - ch % 2)).floor().long() - ch // 2
    cx = (u[6] * (w + 1 - cw % 2)).floor().long() - cw // 2
    rows = torch.arange(h, device=x.device)[None]
    cols = torch.arange(w, device=x.device)[None]
    in_r = (rows >= cy[:, None]) & (rows < cy[:, None] + ch)  # B×H
    in_c = (cols >= cx[:, None]) & (cols < cx[:, None] + cw)  # B×W
    keep = ~(in_r[:, :, None] & in_c[:, None, :])
    return x * keep[:, None].to(x.dtype)


class VirtualBatchNorm1d(nn.Module):
    """Batch norm over groups of `virtual_batch` images (statistics over the group's images and
    the L tokens, per channel; no running statistics, the same in train and eval), as the
    reference's DINO heads use it: the discriminator never sees a whole batch's statistics.
    x B×D×L -> B×D×L (float32)."""

    def __init__(self, dim: int, virtual_batch: int = VIRTUAL_BATCH, eps: float = 1e-6):
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        groups = math.ceil(x.shape[0] / self.virtual_batch)
        out = []
        for g in x.tensor_split(groups, dim=0):
            mean = g.mean(dim=(0, 2), keepdim=True)
            var = g.var(dim=(0, 2), keepdim=True, unbiased=False)
            out.append((g - mean) * torch.rsqrt(var + self.eps))
        return torch.cat(out) * self.weight[None, :, None] + self.bias[None, :, None]


def _sn_conv(cin: int, cout: int, kernel: int) -> nn.Module:
    """Spectral-normalised Conv1d (one power iteration per forward); circular padding over the
    token sequence."""
    from torch.nn.utils.parametrizations import spectral_norm

    return spectral_norm(nn.Conv1d(cin, cout, kernel, padding=kernel // 2,
                                   padding_mode="circular"))


class _Block(nn.Sequential):
    def __init__(self, dim: int, kernel: int, virtual_batch: int):
        super().__init__(_sn_conv(dim, dim, kernel), VirtualBatchNorm1d(dim, virtual_batch),
                         nn.LeakyReLU(0.2))


class _Head(nn.Module):
    """Per-token head on one tap: block(1x1) -> residual block(k=9), scaled by 1/sqrt(2) ->
    spectral-normalised 1x1 conv to one logit. x B×D×L -> B×L."""

    def __init__(self, dim: int, virtual_batch: int = VIRTUAL_BATCH):
        super().__init__()
        self.inp = _Block(dim, 1, virtual_batch)
        self.res = _Block(dim, HEAD_KERNEL, virtual_batch)
        self.out = _sn_conv(dim, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        x = (self.res(x) + x) * (1.0 / math.sqrt(2.0))
        return self.out(x).squeeze(1)


def load_dino_backbone(weights: Path | None) -> nn.Module:
    """timm ViT-S/16 (`vit_small_patch16_224.dino` layout), frozen, in eval mode.

    weights: a local file (safetensors or a torch checkpoint, timm's or the DINO release's
    `dino_deitsmall16_pretrain.pth`; a classifier head, if any, is ignored); None = random
    weights (tests only: never downloaded).
    """
    import timm

    bb = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)
    if weights is not None:
        path = Path(weights)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("model", sd.get("state_dict", sd)) if isinstance(sd, dict) else sd
        sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("head")}
        missing, unexpected = bb.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a DINO ViT-S/16 checkpoint: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    return bb.requires_grad_(False).eval()


class DinoDiscriminator(nn.Module):
    """The paper's DINO discriminator ("dinodisc", Table 6; StyleGAN-T style).

    A frozen DINO ViT-S/16 is read at the patch embedding (+ position embedding) and after
    blocks 2, 5, 8, 11; each read-out (patch tokens + class token, B×384×196) goes through its
    own trainable `_Head` (spectral-normalised convs, virtual batch norm), and the 5×196 token
    logits are concatenated. The backbone is never in an optimiser and stays in eval mode;
    gradients still flow *through* it to a generated image during the generator update.
    Input images in [0, 1], B×3×H×W: larger than 224, half of the calls take a random 224 crop
    and the others an area resize (reference); smaller ones are resized bicubically.
    """

    def __init__(self, weights: Path | None, taps: tuple[int, ...] = DINO_TAPS,
                 virtual_batch: int = VIRTUAL_BATCH):
        super().__init__()
        self.backbone = load_dino_backbone(weights)
        self.taps = tuple(taps)
        dim = self.backbone.embed_dim
        self.heads = nn.ModuleList(_Head(dim, virtual_batch) for _ in range(len(self.taps) + 1))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()  # frozen features: never in train mode
        return self

    def _resize(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        h, w = x.shape[-2:]
        if (h, w) == (DINO_SIZE, DINO_SIZE):
            return x
        if h > DINO_SIZE and w > DINO_SIZE:
            coin, oy, ox = _uniform((3,), generator, "cpu").tolist()
            if coin < 0.5:
                y, z = int(oy * (h - DINO_SIZE + 1)), int(ox * (w - DINO_SIZE + 1))
                return x[..., y:y + DINO_SIZE, z:z + DINO_SIZE]
            return F.interpolate(x, size=DINO_SIZE, mode="area")
        return F.interpolate(x, size=DINO_SIZE, mode="bicubic", align_corners=False)

    def readouts(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """images B×3×H×W in [0, 1] -> len(taps)+1 read-outs, each B×D×L (float32)."""
        x = self._resize(images.float(), generator)
        x = (x - self.mean) / self.std
        bb = self.backbone
        x = bb.norm_pre(bb._pos_embed(bb.patch_embed(x)))  # B×(1+L)×D, class token first

        def read(t: Tensor) -> Tensor:
            return (t[:, 1:].float() + t[:, :1].float()).transpose(1, 2)

        outs = [read(x)]
        for i, block in enumerate(bb.blocks[:max(self.taps) + 1]):
            x = block(x)
            if i in self.taps:
                outs.append(read(x))
        return outs

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images B×3×H×W in [0, 1] -> logits B×((len(taps)+1)·L)."""
        return torch.cat([head(r) for head, r in zip(self.heads, self.readouts(images, generator))],
                         dim=1)


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


