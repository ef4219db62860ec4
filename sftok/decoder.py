"""ViT decoder over [class ; N proxy tokens ; K condition tokens] -> logits B×N×V.

Golden README item 4: proxy tokens are an Embedding of V+1 rows (row V = mask) plus a learned
positional embedding shared with the class token (N+1 rows); condition tokens are
Linear(C -> W)(z_q) plus their own positional embedding. After the blocks, positions 1..N go
through `ln_post` and the reference's legacy head, two 1×1 convs on the grid map with a tanh
between (W -> 2W -> V). A 1×1 conv on the raster-ordered map is a per-position linear layer, so
the head is two Linear layers on B×N×W here (official.py reshapes the conv weights).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sftok.config import TokenizerConfig
from sftok.nn.vit import LN_EPS, Transformer


class Decoder(nn.Module):
    """(proxy ids B×N with mask id V, z_q B×K×C) -> logits B×N×V."""

    def __init__(self, cfg: TokenizerConfig, num_codes: int, grid: int):
        super().__init__()
        d = cfg.decoder
        w, k = d.width, cfg.num_latent_tokens
        self.num_codes, self.grid, self.num_positions = num_codes, grid, grid * grid
        self.mask_id = num_codes  # V: one past the teacher codebook
        self.num_latent_tokens = k

        scale = w ** -0.5
        self.decoder_embed = nn.Linear(cfg.token_size, w)
        self.condition_positional_embedding = nn.Parameter(scale * torch.randn(k, w))
        self.class_embedding = nn.Parameter(scale * torch.randn(1, w))
        self.learnable_embedding = nn.Embedding(num_codes + 1, w)  # proxy ids, row V = mask
        with torch.no_grad():
            self.learnable_embedding.weight.copy_(scale * torch.randn(num_codes + 1, w))
        self.learnable_embedding_positional_embedding = nn.Parameter(
            scale * torch.randn(self.num_positions + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=LN_EPS)
        self.transformer = Transformer(w, d.depth, d.heads, d.mlp_ratio)
        self.ln_post = nn.LayerNorm(w, eps=LN_EPS)
        # The reference's "legacy" head (`ffn`): W -> 2W -> tanh -> V per position.
        self.head = nn.Sequential(nn.Linear(w, 2 * w), nn.Tanh(), nn.Linear(2 * w, num_codes))

    def forward(self, proxy_ids: Tensor, z_q: Tensor) -> Tensor:
        """proxy_ids B×N long (V = masked), z_q B×K×C -> logits B×N×V."""
        b, n = proxy_ids.shape
        if n != self.num_positions or z_q.shape[1] != self.num_latent_tokens:
            raise ValueError(f"decoder expects B×{self.num_positions} proxy ids and "
                             f"B×{self.num_latent_tokens}×C tokens, got {tuple(proxy_ids.shape)} "
                             f"and {tuple(z_q.shape)}")
        cond = self.decoder_embed(z_q) + self.condition_positional_embedding  # B×K×W
        proxy = self.learnable_embedding(proxy_ids).to(cond.dtype)  # B×N×W
        cls = self.class_embedding.expand(b, -1, -1).to(cond.dtype)
        proxy = torch.cat([cls, proxy], dim=1) + self.learnable_embedding_positional_embedding
        x = self.transformer(self.ln_pre(torch.cat([proxy, cond], dim=1)))  # B×(1+N+K)×W
        x = self.ln_post(x[:, 1:1 + n])  # B×N×W
        return self.head(x)  # B×N×V
