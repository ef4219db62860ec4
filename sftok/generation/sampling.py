"""Class-conditional sampling: guided multi-step decoding of K tokens, then pixels.

The loop is the tokenizer's own (`sftok.decoding.decode`): Gumbel temperature tau*(1-r) on
sampling and on the confidences (DecodeConfig temperature = confidence_noise = tau), arccos
schedule, K = 64 and S = 8 fix 6, 5, 5, 6, 6, 7, 9, 20 tokens. Guidance lives in the logits
function (`guidance.GuidedLogits`). Generated tokens become pixels through the tokenizer's own
multi-step decoder (`SFTok.pixels_from_latent`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sftok.config import DecodeConfig, SamplingConfig
from sftok.decoding import decode
from sftok.generation.guidance import GuidedLogits


def sampling_decode_config(cfg: SamplingConfig) -> DecodeConfig:
    """The decode-loop settings of a sampling config (tau on sampling and confidence)."""
    return DecodeConfig(steps=cfg.steps, schedule=cfg.schedule, temperature=cfg.temperature,
                        confidence_noise=cfg.temperature)


@torch.no_grad()
def sample_tokens(model, labels: Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | None = None) -> Tensor:
    """labels B (class indices) -> token ids B×K in [0, Q). Call with the model in eval()."""
    fn = GuidedLogits(model, labels, cfg)
    res = decode(fn, labels.shape[0], model.num_tokens, model.mask_id,
                 sampling_decode_config(cfg), generator=generator, device=labels.device)
    return res.ids


def class_balanced_labels(classes: list[int] | Tensor, per_class: int) -> Tensor:
    """Exactly `per_class` copies of each class, grouped by class: LongTensor len(classes)·n."""
    classes = torch.as_tensor(classes, dtype=torch.long)
    if per_class < 1 or classes.numel() == 0:
        raise ValueError(f"class_balanced_labels: need classes and per_class >= 1, got "
                         f"{classes.numel()} classes and per_class={per_class}")
    return classes.repeat_interleave(per_class)


@torch.no_grad()
def tokens_to_images(tokenizer, teacher, ids: Tensor, decode_cfg: DecodeConfig,
                     generator: torch.Generator | None = None) -> Tensor:
    """Token ids B×K -> pixels B×3×H×W in [0, 1] through the tokenizer's S-step decoder."""
    z_q = tokenizer.ids_to_latent(ids)
    return tokenizer.pixels_from_latent(z_q, teacher, decode_cfg, generator=generator)
