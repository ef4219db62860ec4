"""AdamW with the paper's no-weight-decay groups, and the LR schedule (paper Table 6).

Weight decay is applied only to matrices/kernels of linear and conv layers. No decay for:
biases, every parameter of a norm layer, embeddings (token/proxy embeddings, codebooks),
positional / class / latent / mask tokens — the usual ViT recipe the reference follows.

The LR schedule is a pure function of the optimiser step (linear warm-up to `lr`, then cosine
to `end_lr`), so the "scheduler state" that a checkpoint needs is just the step.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from sftok.config import OptimConfig

# Name fragments of parameters that are embeddings/tokens even when they are >= 2-D tensors.
_NO_DECAY_NAMES = ("embed", "embedding", "positional", "pos_emb", "class_emb", "cls_token",
                   "latent_tokens", "mask_token", "codebook")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d,
          nn.RMSNorm)


def no_decay_names(model: nn.Module) -> set[str]:
    """Full names of the trainable parameters that must not be weight-decayed."""
    out: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            lowered = full.lower()
            if (p.ndim < 2 or isinstance(module, (nn.Embedding, *_NORMS))
                    or any(frag in lowered for frag in _NO_DECAY_NAMES)):
                out.add(full)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the parameters with requires_grad: decay and no-decay."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model_or_groups: nn.Module | Iterable[dict], cfg: OptimConfig,
                    device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW(lr, betas, weight_decay) over `param_groups(model)` (or explicit groups)."""
    groups = (param_groups(model_or_groups, cfg.weight_decay)
              if isinstance(model_or_groups, nn.Module) else list(model_or_groups))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                             fused=fused_adamw(device))


def fused_adamw(device: torch.device | str | None) -> bool | None:
    """AdamW's `fused` argument for parameters on `device`: True on CUDA (one kernel for all
    parameters, and its step counters stay on the GPU, so a step reads nothing back); None
    elsewhere, torch's default (foreach) path, which keeps CPU runs bitwise resumable."""
    return True if device is not None and torch.device(device).type == "cuda" else None


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for 0-based optimiser step `step` of `total_steps`.

    Linear warm-up lr·(step+1)/warmup over `warmup_steps`, then (schedule="cosine") cosine decay
    from lr to end_lr over the remaining steps, or (schedule="constant") lr.
    """
    warm = max(0, cfg.warmup_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return cfg.end_lr + 0.5 * (cfg.lr - cfg.end_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
