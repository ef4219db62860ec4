"""Shared fakes for the evaluation tests (no tests here).

`FakeTeacher` / `FakeTokenizer` implement exactly the parts of the FrozenTeacher / SFTok
contracts (docs/architecture.md) that `evaluate()` uses, at toy size, with the real decode loop
(`sftok.decoding.decode`). `TinyExtractor` is a deterministic torch-fidelity feature extractor,
registered only by the tests that use it.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from sftok.decoding import decode

V, GRID, SIZE, K, Q = 16, 4, 16, 4, 8  # teacher codes, code grid, image side, latent tokens, tokenizer codes
N = GRID * GRID


class FakeTeacher(nn.Module):
    """ids = brightness of each 4×4 patch quantised to V levels; decode = flat grey patches."""

    codebook_size = V
    grid = GRID

    def __init__(self, size: int = SIZE):
        super().__init__()
        self.size = size

    def encode_ids(self, images):  # B×3×size×size -> B×N
        m = F.adaptive_avg_pool2d(images.mean(1, keepdim=True), GRID)  # B×1×4×4
        return (m * V).floor().clamp(0, V - 1).long().flatten(1)

    def decode_ids(self, ids):  # B×N -> B×3×size×size in [0, 1]
        v = ((ids.float() + 0.5) / V).reshape(-1, 1, GRID, GRID)
        return F.interpolate(v, size=self.size, mode="nearest").expand(-1, 3, -1, -1)


class FakeTokenizer(nn.Module):
    """K = 4 tokens from 2×2 brightness, Q = 8 codes; a fixed random 'decoder' over proxy ids."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cfg = SimpleNamespace(quantizer=SimpleNamespace(codebook_size=Q))
        self.mask_id = V
        self.codebook = nn.Parameter(torch.randn(Q, 6, generator=g))
        self.embed = nn.Parameter(torch.randn(V + 1, 6, generator=g))
        self.pos = nn.Parameter(torch.randn(N, 6, generator=g))
        self.out = nn.Parameter(torch.randn(6, V, generator=g))

    def encode(self, images):
        m = F.adaptive_avg_pool2d(images.mean(1, keepdim=True), 2).flatten(1)  # B×K
        ids = (m * Q).floor().clamp(0, Q - 1).long()
        return SimpleNamespace(ids=ids, z_q=self.codebook[ids], loss=torch.zeros(()), losses={})

    def decoder_logits(self, proxy_ids, z_q):  # B×N, B×K×C -> B×N×V
        h = self.embed[proxy_ids] + self.pos + z_q.mean(1, keepdim=True)
        return 3.0 * torch.tanh(h) @ self.out

    def generate(self, z_q, cfg, generator=None, trace=False):
        return decode(lambda ids: self.decoder_logits(ids, z_q), z_q.shape[0], N, self.mask_id,
                      cfg, generator=generator, trace=trace, device=z_q.device)

    def pixels_from_latent(self, z_q, teacher, cfg, generator=None):
        return teacher.decode_ids(self.generate(z_q, cfg, generator).ids)

    def reconstruct(self, images, teacher, cfg, generator=None):
        return self.pixels_from_latent(self.encode(images).z_q, teacher, cfg, generator)


def fake_images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """n smooth-ish random images 3×size×size in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def batches(x: torch.Tensor, bs: int):
    """(images, labels) batches, as the data module yields them."""
    for i in range(0, len(x), bs):
        yield x[i:i + bs], torch.zeros(len(x[i:i + bs]), dtype=torch.long)


# ---------------------------------------------------------------- torch-fidelity test extractor
TINY_NAME = "sftok-test-tiny"


def _tiny_cls():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class TinyExtractor(FeatureExtractorBase):
        """uint8 B×3×H×W -> 'feat' (B×8) and 'logits' (B×5): fixed random maps of 4×4 pooled pixels."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(123)
            self.register_buffer("w_feat", torch.randn(48, 8, generator=g))
            self.register_buffer("w_logit", torch.randn(48, 5, generator=g))

        @staticmethod
        def get_provided_features_list():
            return "feat", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"fid": "feat", "isc": "logits", "kid": "feat", "prc": "feat"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            assert x.dtype == torch.uint8
            h = F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)  # B×48
            out = {"feat": torch.tanh(h @ self.w_feat), "logits": 2.0 * h @ self.w_logit}
            return tuple(out[f] for f in self.features_list)

    return TinyExtractor


def register_tiny_extractor() -> str:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if TINY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY_NAME, _tiny_cls())
    return TINY_NAME
