"""Pre-LN transformer block with the reference's parameter names (golden README item 1).

The reference builds its blocks from `nn.MultiheadAttention` (one fused input projection with
q | k | v stacked in rows, heads contiguous inside each) and an MLP `c_fc -> GELU -> c_proj`.
We keep those names and layouts so official checkpoints load one-to-one, but compute attention
with `F.scaled_dot_product_attention` on batch-first tensors (B×L×W): same function, fused
kernels on GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The reference uses nn.LayerNorm defaults (eps 1e-5) everywhere in its ViTs.
LN_EPS = 1e-5


class Attention(nn.Module):
    """Multi-head self-attention, parameters laid out like `nn.MultiheadAttention`.

    in_proj_weight 3W×W (rows: q | k | v), in_proj_bias 3W, out_proj Linear(W, W).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's own initialisation.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: B×L×W -> B×L×W (no mask: every token attends to every token)."""
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # B×L×3W
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # B×H×L×D, scale 1/sqrt(D) as in MHA
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w))


class Mlp(nn.Sequential):
    """c_fc -> exact GELU -> c_proj (keys mlp.c_fc.*, mlp.c_proj.*)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()  # exact (erf) GELU, as nn.GELU() in the reference
        self.c_proj = nn.Linear(hidden, width)


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)). B×L×W -> B×L×W."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.ModuleList):
    """`depth` blocks; keys `<name>.<i>.ln_1...` like the reference's ModuleList `transformer`."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__([Block(width, heads, mlp_ratio) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        for block in self:
            x = block(x)
        return x


def init_vit_weights(module: nn.Module) -> None:
    """The reference's initialisation: trunc-normal(0.02) Linear/Conv/Embedding, unit LayerNorm.

    Apply with `model.apply(init_vit_weights)`; the fused attention input projection (a bare
    Parameter, not a Linear) keeps its Xavier initialisation, as in the reference.
    """
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
