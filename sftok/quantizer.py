"""Quantizers: token vectors B×K×C -> codes of a Q×C codebook (DESIGN §1 'Quantizer').

- `VectorQuantizer` (`vq`): l2-normalised tokens and codes, nearest code, straight-through.
- `OptVQQuantizer` (`optvq`, paper default; golden README item 3): l2-normalised tokens; codes =
  normalise(shared_linear(E)) with the shared linear initialised to identity; cost = Euclidean
  distance minus its minimum; Sinkhorn-Knopp (cost × epsilon, a few iterations) over all token
  vectors of the batch; id = argmax of the plan.

Both return a `QuantOutput` with the straight-through z_q (value = chosen code, gradient = that
of the normalised input), the ids, and the losses: commitment · ‖sg(z_q) − z‖² + ‖z_q − sg(z)‖²
(means over all elements).

`assign_at_inference` (OptVQ only): the reference runs Sinkhorn at inference too, so an image's
ids depend on the other images of its batch. `nearest` (our default) uses the batch-independent
nearest code in eval mode; `sinkhorn` reproduces the reference. Training always uses Sinkhorn.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sftok.config import QuantizerConfig


@dataclass
class QuantOutput:
    z_q: Tensor  # B×K×C straight-through quantised tokens (l2-normalised)
    ids: Tensor  # B×K long code ids in [0, Q)
    loss: Tensor  # scalar: commitment + codebook loss (already weighted)
    losses: dict[str, Tensor] = field(default_factory=dict)  # "commitment", "codebook"
    z: Tensor | None = None  # B×K×C the normalised pre-quantisation tokens


def sinkhorn(cost: Tensor, iters: int = 5, epsilon: float = 10.0) -> Tensor:
    """Sinkhorn-Knopp transport plan between M samples and Q codes, as the reference computes it.

    cost: M×Q (non-negative) -> plan M×Q. Starting from exp(−epsilon·cost) normalised to total
    mass 1, each iteration rescales every code's column to mass 1/Q, then every sample's row to
    mass 1/M; finally the plan is multiplied by M so each row (one sample's assignment
    distribution) sums to 1 and, as iterations grow, each code column sums to M/Q.
    The 1e-8 guards match the reference's arithmetic so argmax ids agree bit for bit.
    """
    m, q = cost.shape
    plan = torch.exp(-cost * epsilon)
    plan = plan / (plan.sum() + 1e-8)
    for _ in range(iters):
        plan = plan / (plan.sum(dim=0, keepdim=True) + 1e-8) / q  # codes: mass 1/Q each
        plan = plan / (plan.sum(dim=1, keepdim=True) + 1e-8) / m  # samples: mass 1/M each
    return plan * m


def _st_output(z: Tensor, z_code: Tensor, ids: Tensor, commitment: float,
               codebook_weight: float) -> QuantOutput:
    """Losses and straight-through estimator shared by both quantizers (z, z_code: B×K×C)."""
    commit = commitment * torch.mean((z_code.detach() - z) ** 2)
    book = codebook_weight * torch.mean((z_code - z.detach()) ** 2)
    z_q = z + (z_code - z).detach()  # value of the code, gradient of z
    return QuantOutput(z_q=z_q, ids=ids, loss=commit + book,
                       losses={"commitment": commit, "codebook": book}, z=z)


def _float32(forward):
    """Run a quantizer's forward in float32 even under autocast, as the reference does: ids and
    the commitment/codebook losses are sensitive to bf16 rounding (at Q = 8192 a few percent of
    the ids change), and training would assign ids differently from fp32 evaluation."""

    @functools.wraps(forward)
    def wrapped(self, z: Tensor) -> QuantOutput:
        with torch.autocast(z.device.type, enabled=False):
            return forward(self, z.float())

    return wrapped


class VectorQuantizer(nn.Module):
    """`vq`: l2-normalised nearest code (no Sinkhorn, no shared linear). z B×K×C -> QuantOutput."""

    def __init__(self, cfg: QuantizerConfig, token_size: int):
        super().__init__()
        self.cfg = cfg
        self.codebook_size, self.token_size = cfg.codebook_size, token_size
        self.embedding = nn.Embedding(cfg.codebook_size, token_size)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)

    def codebook(self) -> Tensor:
        """Q×C normalised codes."""
        return F.normalize(self.embedding.weight, dim=-1)

    def ids_to_latent(self, ids: Tensor) -> Tensor:
        """ids B×K -> B×K×C normalised codes."""
        return F.normalize(self.embedding(ids), dim=-1)

    @_float32
    def forward(self, z: Tensor) -> QuantOutput:
        z = F.normalize(z, dim=-1)
        b, k, c = z.shape
        with torch.no_grad():
            ids = torch.cdist(z.reshape(b * k, c), self.codebook()).argmin(dim=-1).view(b, k)
        return _st_output(z, self.ids_to_latent(ids), ids, self.cfg.commitment,
                          self.cfg.codebook_weight)


class OptVQQuantizer(nn.Module):
    """`optvq`: Sinkhorn assignment over the batch (golden README item 3). z B×K×C -> QuantOutput.

    Parameters: `embedding` Q×C (the reference stores 1×Q×C, one group) and `shared_linear`
    C×C (+bias), initialised to the identity.
    """

    def __init__(self, cfg: QuantizerConfig, token_size: int):
        super().__init__()
        self.cfg = cfg
        self.codebook_size, self.token_size = cfg.codebook_size, token_size
        q = cfg.codebook_size
        self.embedding = nn.Parameter(torch.empty(q, token_size).uniform_(-1.0 / q, 1.0 / q))
        self.shared_linear = nn.Linear(token_size, token_size)
        # Offset of each codebook group's ids in a shared id space; we use one group, so [0]. Kept
        # as a buffer because released checkpoints store it (the importer checks it is [0]).
        self.register_buffer("index_offset", torch.zeros(1, dtype=torch.long))
        with torch.no_grad():
            self.shared_linear.weight.copy_(torch.eye(token_size))
            self.shared_linear.bias.zero_()

    def codebook(self) -> Tensor:
        """Q×C normalised codes normalise(shared_linear(E))."""
        return F.normalize(self.shared_linear(self.embedding), dim=-1)

    def ids_to_latent(self, ids: Tensor) -> Tensor:
        """ids B×K -> B×K×C normalised codes."""
        return F.normalize(self.shared_linear(self.embedding)[ids], dim=-1)

    def assign(self, z: Tensor, codes: Tensor, use_sinkhorn: bool) -> Tensor:
        """z M×C, codes Q×C (both normalised) -> ids M. Euclidean (not squared) cost."""
        dist = torch.cdist(z, codes, p=2)  # M×Q
        if not use_sinkhorn:
            return dist.argmin(dim=-1)
        plan = sinkhorn(dist - dist.min(), self.cfg.sinkhorn_iters, self.cfg.sinkhorn_epsilon)
        return plan.argmax(dim=-1)

    @_float32
    def forward(self, z: Tensor) -> QuantOutput:
        z = F.normalize(z, dim=-1)
        b, k, c = z.shape
        use_sinkhorn = self.training or self.cfg.assign_at_inference == "sinkhorn"
        with torch.no_grad():
            ids = self.assign(z.reshape(b * k, c), self.codebook(), use_sinkhorn).view(b, k)
        return _st_output(z, self.ids_to_latent(ids), ids, self.cfg.commitment,
                          self.cfg.codebook_weight)


def build_quantizer(cfg: QuantizerConfig, token_size: int) -> VectorQuantizer | OptVQQuantizer:
    if cfg.kind == "vq":
        return VectorQuantizer(cfg, token_size)
    if cfg.kind == "optvq":
        return OptVQQuantizer(cfg, token_size)
    raise ValueError(f"unknown quantizer kind {cfg.kind!r} (known: vq, optvq)")
