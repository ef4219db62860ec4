"""The class-conditional token generator: a bidirectional transformer (MaskGIT, paper §4.3).

    input  [class token ; K image tokens]            B×(1+K) ids
    vocab  0..Q-1 image ids | Q mask | Q+1..Q+C classes | Q+1+C null class
    output logits over the Q image ids at the K image positions  B×K×Q

The layout of the vocabulary and the head follow the released generator (the authors' fork of
TiTok's `ImageBert`): one embedding table for image ids, mask, classes and the null class, a
learned absolute position per slot, and a head over the Q image ids only. The blocks are the
project's pre-LN blocks (`sftok.nn.vit`), not BERT's post-LN ones; dropout (0.1 in the released
config) acts on the embeddings and on the last hidden state.
Labels are class indices in [0, C) or `null_label` (= C, "no class": the unconditional model
of classifier-free guidance).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sftok.config import GeneratorModelConfig
from sftok.nn.vit import LN_EPS, Transformer, init_vit_weights


class MaskGITGenerator(nn.Module):
    """num_codes = Q (tokenizer codebook), num_tokens = K, num_classes = C."""

    def __init__(self, cfg: GeneratorModelConfig, num_codes: int, num_tokens: int,
                 num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_codes, self.num_tokens, self.num_classes = num_codes, num_tokens, num_classes
        self.mask_id = num_codes  # Q
        self.null_label = num_classes  # C
        vocab = num_codes + 1 + num_classes + 1
        self.token_embedding = nn.Embedding(vocab, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(1 + num_tokens, cfg.width))
        self.dropout = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.head = nn.Linear(cfg.width, num_codes)
        self.apply(init_vit_weights)
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)

    def class_token_ids(self, labels: Tensor) -> Tensor:
        """labels B in [0, C] (C = null) -> vocabulary ids B (Q + 1 + label)."""
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.null_label):
            raise ValueError(f"generator: labels must be in [0, {self.num_classes}] "
                             f"({self.num_classes} = null class), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return labels + self.num_codes + 1

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """ids B×K (mask_id where masked), labels B -> logits B×K×Q."""
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens or labels.shape != ids.shape[:1]:
            raise ValueError(f"generator: expected ids B×{self.num_tokens} and labels B, got "
                             f"{tuple(ids.shape)} and {tuple(labels.shape)}")
        x = torch.cat([self.class_token_ids(labels)[:, None], ids], dim=1)  # B×(1+K)
        h = self.dropout(self.token_embedding(x) + self.positional_embedding)
        h = self.dropout(self.ln_post(self.transformer(h)))
        return self.head(h[:, 1:])  # drop the class slot


def drop_labels(labels: Tensor, prob: float, null_label: int,
                generator: torch.Generator | None = None, draws: Tensor | None = None) -> Tensor:
    """Classifier-free guidance training: each label becomes `null_label` with probability
    `prob` (0.1 in the released config). Draws B uniforms from `generator` on its device
    (`draws`: those uniforms, drawn ahead of the step)."""
    if draws is None:
        dev = generator.device if generator is not None else labels.device
        draws = torch.rand(labels.shape, generator=generator, device=dev)
    coin = draws.to(labels.device) < prob
    return torch.where(coin, torch.full_like(labels, null_label), labels)
