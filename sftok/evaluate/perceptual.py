"""LPIPS through the `lpips` package (paper Table 1), with the offline rule of DESIGN §2.

LPIPS = a torchvision ImageNet backbone (AlexNet by default — the `lpips` authors' choice as
a forward metric; VGG16 selectable) + linear heads that ship inside the `lpips` package. Only
the backbone would be downloaded (by torchvision, into the torch hub cache). We look for it as
(1) an explicit path, (2) $SFTOK_LPIPS_WEIGHTS, (3) `<torch hub dir>/checkpoints/<torchvision
file name>`, and never download: when absent, LPIPS is unavailable with one message.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from sftok.weights import find_weights

LPIPS_ENV = "SFTOK_LPIPS_WEIGHTS"
# Smallest image side each backbone's pooling stack accepts (AlexNet: 16 px collapses to 0).
MIN_SIZE = {"alex": 32, "vgg": 16}


def _torchvision_weights(net: str):
    from torchvision import models

    return {"alex": models.AlexNet_Weights.IMAGENET1K_V1,
            "vgg": models.VGG16_Weights.IMAGENET1K_V1}[net]


def find_lpips_backbone(net: str = "alex", path: str | os.PathLike | None = None
                        ) -> tuple[Path | None, str]:
    """(backbone weights file, "") or (None, one message saying how to provide it)."""
    url = _torchvision_weights(net).url
    fname = url.rsplit("/", 1)[-1]
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / fname
    how = (f"set {LPIPS_ENV}=/path/to/{fname} (or pass lpips_weights=...), or put the file in "
           f"the torch hub cache as {hub_file} (torchvision's {net} ImageNet weights, {url})")
    return find_weights("LPIPS backbone weights", ("lpips_weights", path), LPIPS_ENV, hub_file,
                        how)


class LPIPSMetric:
    """LPIPS distance per image. __call__(x, y: float B×3×H×W in [0, 1]) -> (B,) float32.

    Built with `pnet_rand=True` so `lpips` never downloads; the backbone's torchvision weights
    are then loaded from `weights_path` (weights_only) into the package's feature slices.
    `min_size`: the smallest image side the backbone's pooling stack accepts.
    """

    def __init__(self, weights_path: str | os.PathLike, net: str = "alex",
                 device: torch.device | str = "cpu"):
        import warnings

        import lpips

        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        # lpips splits torchvision's `features` into slices whose children keep the original
        # indices as names (lpips/pretrained_networks.py): features.<i>.* -> slice?.<i>.*
        layers = {idx: layer for name, sl in self.model.net.named_children()
                  if name.startswith("slice") for idx, layer in sl.named_children()}
        loaded = set()
        for idx, layer in layers.items():
            own = layer.state_dict()
            if not own:
                continue  # ReLU / pooling
            sub = {k: state[f"features.{idx}.{k}"] for k in own if f"features.{idx}.{k}" in state}
            if len(sub) != len(own):
                raise ValueError(f"{weights_path}: missing torchvision {net} keys features.{idx}.*")
            layer.load_state_dict(sub)
            loaded.add(idx)
        if not loaded:
            raise ValueError(f"{weights_path}: no torchvision {net} `features.*` weights found")
        self.model.requires_grad_(False).eval().to(device)
        self.device = torch.device(device)
        self.min_size = MIN_SIZE[net]

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        d = self.model(x.to(self.device).float(), y.to(self.device).float(), normalize=True)
        return d.reshape(-1).float()
