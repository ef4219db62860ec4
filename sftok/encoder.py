"""ViT encoder with K latent query tokens: images B×3×H×W -> B×K×C (before quantisation).

Sequence (golden README item 1): [class token ; grid² patch tokens ; K latent tokens]. The first
two parts share one learned positional embedding (grid²+1 rows), the latents have their own.
Only the K latent outputs are kept, normalised by `ln_post` and projected W -> C.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sftok.config import TokenizerConfig
from sftok.nn.vit import LN_EPS, Transformer


class Encoder(nn.Module):
    """images B×3×H×W in [0, 1] (no mean/std normalisation, as the reference) -> z B×K×C."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        e = cfg.encoder
        w, k = e.width, cfg.num_latent_tokens
        if cfg.image_size % e.patch_size:
            raise ValueError(f"patch_size={e.patch_size} must divide image_size={cfg.image_size}")
        self.grid = cfg.image_size // e.patch_size
        self.width, self.num_latent_tokens, self.token_size = w, k, cfg.token_size
        # Golden README item 2: the reference reinterprets (B, K, W) as (B, W, K, 1) before its
        # 1x1 conv_out; trained official weights depend on that scrambling.
        self.legacy_reshape = e.legacy_reshape

        scale = w ** -0.5
        self.patch_embed = nn.Conv2d(3, w, kernel_size=e.patch_size, stride=e.patch_size)
        self.class_embedding = nn.Parameter(scale * torch.randn(1, w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, w))
        # The reference keeps the latent queries on the tokenizer (`latent_tokens`); they are
        # an encoder input only, so they live here (official.py maps the key).
        self.latent_tokens = nn.Parameter(scale * torch.randn(k, w))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(k, w))
        self.ln_pre = nn.LayerNorm(w, eps=LN_EPS)
        self.transformer = Transformer(w, e.depth, e.heads, e.mlp_ratio)
        self.ln_post = nn.LayerNorm(w, eps=LN_EPS)
        # Per-token projection W -> C (the reference's 1x1 `conv_out`, kept as a Linear here).
        self.proj_out = nn.Linear(w, cfg.token_size)

    def forward(self, images: Tensor) -> Tensor:
        """images B×3×H×W -> z B×K×C."""
        b = images.shape[0]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # B×grid²×W (raster order)
        cls = self.class_embedding.expand(b, -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        lat = (self.latent_tokens + self.latent_token_positional_embedding).to(x.dtype)
        x = torch.cat([x, lat.expand(b, -1, -1)], dim=1)  # B×(1+grid²+K)×W
        x = self.transformer(self.ln_pre(x))
        lat = self.ln_post(x[:, 1 + self.grid ** 2:])  # B×K×W
        if self.legacy_reshape:
            # Plain reshape (B, K, W) -> (B, W, K): "channel" w of token k reads element
            # k*W + w of a different (token, channel) pair; golden README item 2.
            lat = lat.reshape(b, self.width, self.num_latent_tokens).transpose(1, 2)
        return self.proj_out(lat)  # B×K×C
