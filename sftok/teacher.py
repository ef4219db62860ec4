"""The MaskGIT-VQGAN teacher (golden README item 7) and its frozen wrapper.

Architecture, in the reference's key layout (`encoder.*`, `decoder.*`, `quantize.embedding.weight`):
- every conv uses TF-style "same" padding (extra pixel on the right/bottom when the padding is
  odd; with the stride-1, odd-kernel convs used here that is plain symmetric padding);
- residual blocks: GN(32, eps 1e-6) -> SiLU -> conv3×3 (no bias), twice; where the channel
  count changes, a 1×1 `nin_shortcut` (no bias) is applied to the block's *output* and added to
  it (the reference's quirk; the input is dropped): out = h + nin_shortcut(h);
- encoder: conv_in (no bias), one level per `channel_mult` entry with `num_res_blocks` blocks
  and 2×2 average pooling after every level but the last, `num_res_blocks` mid blocks,
  GN -> SiLU -> conv1×1 to Z channels;
- decoder: conv_in 3×3 Z -> W_last, mid blocks, levels from the last to the first
  (`decoder.up.<level>`), each `num_res_blocks` blocks then, on every level but level 0,
  nearest ×2 + conv3×3 (`upsample_conv`); GN -> SiLU -> conv3×3 to RGB;
- quantizer: squared-L2 nearest code of V×Z, no normalisation; no attention layers anywhere.
Images are B×3×H×W in [0, 1] (no mean/std normalisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sftok.config import TeacherConfig

GN_EPS = 1e-6


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow "same" padding (asymmetric: the extra pixel goes right/bottom)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, bias: bool = True):
        super().__init__(in_ch, out_ch, kernel_size, bias=bias)

    @staticmethod
    def _same(size: int, k: int, s: int, d: int) -> tuple[int, int]:
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = self._same(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = self._same(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top == bottom and left == right:  # symmetric: let the conv pad (no copy)
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation)
        x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=GN_EPS)


class ResBlock(nn.Module):
    """B×in×h×w -> B×out×h×w; shortcut on the output where channels change (see module doc)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = Conv2dSame(in_ch, out_ch, 3, bias=False)
        self.norm2 = _norm(out_ch)
        self.conv2 = Conv2dSame(out_ch, out_ch, 3, bias=False)
        self.nin_shortcut = Conv2dSame(out_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        residual = x if self.nin_shortcut is None else self.nin_shortcut(h)
        return h + residual


class _Level(nn.Module):
    """One resolution level: `block` (ModuleList of ResBlocks) [+ `upsample_conv`]."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, upsample: bool = False):
        super().__init__()
        self.block = nn.ModuleList(
            [ResBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(num_blocks)])
        self.upsample_conv = Conv2dSame(out_ch, out_ch, 3) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class VQGANEncoder(nn.Module):
    """images B×3×H×W -> latent B×Z×(H/f)×(W/f), f = 2**(levels-1)."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        hid, mult, nrb = cfg.hidden_channels, cfg.channel_mult, cfg.num_res_blocks
        self.conv_in = Conv2dSame(3, hid, 3, bias=False)
        ins = (1,) + tuple(mult)
        self.down = nn.ModuleList([_Level(hid * ins[i], hid * mult[i], nrb)
                                   for i in range(len(mult))])
        mid = hid * mult[-1]
        self.mid = nn.ModuleList([ResBlock(mid, mid) for _ in range(nrb)])
        self.norm_out = _norm(mid)
        self.conv_out = Conv2dSame(mid, cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.down):
            x = level(x)
            if i != len(self.down) - 1:  # downsample after every level but the last
                x = F.avg_pool2d(x, kernel_size=2, stride=2)
        for blk in self.mid:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VQGANDecoder(nn.Module):
    """latent B×Z×h×w -> pixels B×3×(h·f)×(w·f) (not clamped)."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        hid, mult, nrb = cfg.hidden_channels, cfg.channel_mult, cfg.num_res_blocks
        top = hid * mult[-1]
        self.conv_in = Conv2dSame(cfg.z_channels, top, 3)
        self.mid = nn.ModuleList([ResBlock(top, top) for _ in range(nrb)])
        # Indexed by level (up.0 = full resolution) but run from the last level to the first.
        self.up = nn.ModuleList([
            _Level(top if i == len(mult) - 1 else hid * mult[i + 1], hid * mult[i], nrb,
                   upsample=i != 0)
            for i in range(len(mult))])
        self.norm_out = _norm(hid * mult[0])
        self.conv_out = Conv2dSame(hid * mult[0], 3, 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        for blk in self.mid:
            x = blk(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VQGANQuantizer(nn.Module):
    """Codebook `embedding` V×Z; squared-L2 nearest code (no normalisation)."""

    def __init__(self, codebook_size: int, z_channels: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, z_channels)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: Tensor) -> Tensor:
        """z M×Z -> ids M. ‖z‖² + ‖e‖² − 2 z·e, the reference's addmm form (same ids on ties)."""
        e = self.embedding.weight
        dist = torch.addmm(z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None], z, e.t(),
                           alpha=-2.0)
        return dist.argmin(dim=1)


@dataclass
class TeacherOutput:
    recon: Tensor  # B×3×H×W, not clamped
    ids: Tensor  # B×N
    latent: Tensor  # B×Z×h×w encoder output
    loss: Tensor  # codebook + commitment · commit
    losses: dict[str, Tensor]  # "codebook": ‖sg(z) − e‖², "commitment": ‖z − sg(e)‖² (unweighted)


class MaskGitVQGAN(nn.Module):
    """The trainable teacher architecture. Keys: encoder.*, decoder.*, quantize.embedding.weight."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.codebook_size = cfg.codebook_size
        self.downsample = cfg.downsample
        self.encoder = VQGANEncoder(cfg)
        self.decoder = VQGANDecoder(cfg)
        # The official key is `quantize.embedding.weight` while the contract's method is also
        # called `quantize`; register the submodule under that name directly (a class method
        # wins attribute lookup) and reach it through the `quantizer` property.
        self._modules["quantize"] = VQGANQuantizer(cfg.codebook_size, cfg.z_channels)

    @property
    def quantizer(self) -> VQGANQuantizer:
        return self._modules["quantize"]

    def encode(self, images: Tensor) -> Tensor:
        """images B×3×H×W in [0, 1] -> latent B×Z×h×w (before quantisation)."""
        return self.encoder(images)

    def quantize(self, latent: Tensor) -> Tensor:
        """latent B×Z×h×w -> ids B×N (raster order, N = h·w)."""
        b, z, h, w = latent.shape
        flat = latent.permute(0, 2, 3, 1).reshape(b * h * w, z)
        return self.quantizer.nearest(flat).view(b, h * w)

    def embed(self, ids: Tensor) -> Tensor:
        """ids B×N (raster, N a square) -> codebook vectors B×Z×g×g."""
        b, n = ids.shape
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"embed: N={n} is not a square grid")
        return self.quantizer.embedding(ids).view(b, g, g, -1).permute(0, 3, 1, 2)

    def decode(self, latent: Tensor) -> Tensor:
        """latent B×Z×h×w -> pixels B×3×H×W (not clamped)."""
        return self.decoder(latent)

    def forward(self, images: Tensor, commitment: float = 0.25) -> TeacherOutput:
        """Stage-0 training pass: encode, quantise (straight-through), decode."""
        latent = self.encode(images)
        ids = self.quantize(latent)
        e = self.embed(ids)
        codebook = torch.mean((e - latent.detach()) ** 2)
        commit = torch.mean((latent - e.detach()) ** 2)
        z_q = latent + (e - latent).detach()
        return TeacherOutput(recon=self.decode(z_q), ids=ids, latent=latent,
                             loss=codebook + commitment * commit,
                             losses={"codebook": codebook, "commitment": commit})


class FrozenTeacher(nn.Module):
    """A MaskGitVQGAN that stays frozen: no gradients, always eval, never in an optimiser.

    requires_grad_(True) and .train() are refused silently (they leave it frozen); every method
    runs under torch.no_grad(). Not a submodule of SFTok: pass it to the functions that need it.
    """

    def __init__(self, model: MaskGitVQGAN, image_size: int):
        super().__init__()
        if image_size % model.downsample:
            raise ValueError(f"image_size={image_size} is not a multiple of the teacher's "
                             f"downsampling x{model.downsample}")
        self.model = model
        self.codebook_size = model.codebook_size  # V
        self.grid = image_size // model.downsample  # N = grid ** 2
        self.image_size = image_size
        super().requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # frozen: eval mode, always

    def requires_grad_(self, requires_grad: bool = True) -> FrozenTeacher:
        return super().requires_grad_(False)

    @torch.no_grad()
    def encode_ids(self, images: Tensor) -> Tensor:
        """images B×3×H×W in [0, 1] -> teacher ids M_g, LongTensor B×N."""
        self._check()
        return self.model.quantize(self.model.encode(images))

    @torch.no_grad()
    def decode_ids(self, ids: Tensor) -> Tensor:
        """ids B×N -> pixels B×3×H×W clamped to [0, 1]."""
        self._check()
        return self.model.decode(self.model.embed(ids)).clamp(0.0, 1.0)

    @torch.no_grad()
    def codebook(self) -> Tensor:
        """V×Z teacher codebook (for the soft pixel path)."""
        return self.model.quantizer.embedding.weight.detach()

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_ids(images)

    def _check(self) -> None:
        # Catch someone flipping the inner model back to training through `.model.train()`.
        if self.model.training or any(p.requires_grad for p in self.model.parameters()):
            self.model.train(False)
            self.model.requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Weights in the official key layout
# --------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from `.safetensors` or a torch file (`.bin`/`.pt`/`.pth`, weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    from sftok.weights import read_safetensors, torch_load_tensors

    if path.suffix == ".safetensors":
        return read_safetensors(path)
    sd = torch_load_tensors(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise TypeError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def check_state_dict(module: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """Raise ValueError naming missing / unexpected keys and shape mismatches (exact match)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(sd)) if tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:8])}{more}")
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))


def load_teacher_weights(model: MaskGitVQGAN | FrozenTeacher,
                         source: str | Path | dict[str, Tensor]) -> MaskGitVQGAN | FrozenTeacher:
    """Load official-layout weights (e.g. `maskgit-vqgan-imagenet-f16-256.bin`) into `model`.

    source: a path (.bin/.pt/.pth via torch.load(weights_only=True), or .safetensors) or a
    state dict. Keys and shapes must match exactly; errors name what differs.
    """
    target = model.model if isinstance(model, FrozenTeacher) else model
    sd = source if isinstance(source, dict) else read_state_dict(source)
    what = "teacher state dict" if isinstance(source, dict) else f"teacher weights {source}"
    check_state_dict(target, sd, what)
    target.load_state_dict(sd, strict=True)
    if isinstance(model, FrozenTeacher):
        model.requires_grad_(False)
    return model


def infer_teacher_config(sd: dict[str, Tensor], prefix: str = "",
                         codebook_key: str | None = None) -> TeacherConfig:
    """TeacherConfig from official-layout decoder keys `<prefix>decoder.*` (+ codebook).

    Only the products hidden·mult[i] are observable; we report hidden = channels of level 0
    (so channel_mult[0] = 1, true for MaskGIT-VQGAN and our presets). `prefix` lets the SFTok
    importer read its `pixel_decoder.*` copy (prefix="pixel_", codebook "pixel_quantize...").
    """
    dec = f"{prefix}decoder."
    levels = sorted({int(k[len(dec) + 3:].split(".")[0]) for k in sd if k.startswith(dec + "up.")})
    if not levels:
        raise ValueError(f"no '{dec}up.*' keys: not a MaskGIT-VQGAN decoder state dict")
    hidden = sd[f"{dec}up.0.block.0.conv2.weight"].shape[0]
    mult = []
    for i in levels:
        ch = sd[f"{dec}up.{i}.block.0.conv2.weight"].shape[0]
        if ch % hidden:
            raise ValueError(f"level {i} has {ch} channels, not a multiple of level 0's {hidden}")
        mult.append(ch // hidden)
    nrb = len({k.split(".")[4] for k in sd if k.startswith(f"{dec}up.0.block.")})
    cb = sd[codebook_key or f"{prefix}quantize.embedding.weight"]
    return TeacherConfig(hidden_channels=hidden, channel_mult=tuple(mult), num_res_blocks=nrb,
                         z_channels=sd[f"{dec}conv_in.weight"].shape[1],
                         codebook_size=cb.shape[0])


def load_frozen_teacher(path: str | Path, image_size: int,
                        cfg: TeacherConfig | None = None) -> FrozenTeacher:
    """Build a FrozenTeacher from an official-layout file; the config is inferred if not given."""
    sd = read_state_dict(path)
    model = MaskGitVQGAN(cfg or infer_teacher_config(sd))
    load_teacher_weights(model, sd)
    return FrozenTeacher(model, image_size)
