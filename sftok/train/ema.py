"""Exponential moving average of a model's weights (paper Table 6: EMA on).

The decay warms up as min(decay, (1 + n) / (10 + n)) over the n updates so far, so that short
runs (the CPU presets have a few hundred steps) are not dominated by the initial weights; at
paper scale (>= 200k steps) this is the fixed decay after the first few thousand steps.
Floating-point parameters *and* buffers are averaged; integer buffers are copied.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copy of `model.state_dict()` (same keys), updated after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone()
                                          for k, v in model.state_dict().items()}
        self._float_keys = [k for k, v in self.shadow.items() if v.is_floating_point()]
        self._other_keys = [k for k, v in self.shadow.items() if not v.is_floating_point()]

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        state = model.state_dict()
        dst = [self.shadow[k] for k in self._float_keys]
        src = [state[k].detach().to(t.dtype) for k, t in zip(self._float_keys, dst)]
        # One multi-tensor op instead of a kernel launch per tensor (hundreds at ViT-B scale).
        torch._foreach_lerp_(dst, src, 1.0 - d)
        for k in self._other_keys:
            self.shadow[k].copy_(state[k])
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into `model` (e.g. to export or to start the next stage)."""
        model.load_state_dict(self.shadow, strict=True)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: dict[str, Tensor], num_updates: int) -> None:
        missing = set(self.shadow) ^ set(shadow)
        if missing:
            raise KeyError(f"EMA state keys differ from the model's: {sorted(missing)[:5]}")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.num_updates = num_updates
