"""Procedural training images: the dead-leaves model (issue 9, data that generalises).

Dead leaves (Matheron 1968; Lee, Mumford & Huang 2001) stacks opaque discs whose radii follow a
power law p(r) ∝ r^-3 between r_min and r_max: the result is scale-invariant, has occlusion
edges, and a 1/f² power spectrum like natural photographs. Baradad et al. (NeurIPS 2021,
"Learning to see by looking at noise") pre-train image models on such images and find that they
transfer to real photos. Here they add unbounded variety of edges and flat regions to the
handful of embedded photos, so a small teacher learns a codebook of local structure instead of
the patches of seven photos.

Colours are drawn from a pool of pixels of the training photos (natural colour statistics, no
held-out photo involved). The image is drawn at 2× and downsampled with an antialiased filter
(smooth, not aliased, edges), then rounded to uint8 like the photo crops.

Everything is a pure function of the `torch.Generator` passed in: same seed, same image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Radius range in units of the image side: from ~1.5 pixels at 32 px to larger than the image.
R_MIN, R_MAX = 0.05, 0.6
# Centres may lie this far (in image sides) outside the image, so borders look like the middle.
MARGIN = 0.25
# Discs per image: enough that the plane is covered (expected disc area 2π·r_min²·ln(r_max/
# r_min) ≈ 0.039 sides², over a (1 + 2·MARGIN)² = 2.25 region: density ≈ 6.6, 99.9% covered).
NUM_DISCS = 384
SUPERSAMPLE = 2


def sample_radii(n: int, g: torch.Generator, r_min: float = R_MIN,
                 r_max: float = R_MAX) -> torch.Tensor:
    """n radii with density ∝ r^-3 on [r_min, r_max] (inverse CDF), float64 (n,)."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    a, b = r_min ** -2, r_max ** -2
    return (a - u * (a - b)) ** -0.5


def dead_leaves(size: int, colours: torch.Tensor, g: torch.Generator,
                num_discs: int = NUM_DISCS) -> torch.Tensor:
    """One dead-leaves image -> uint8 3×size×size.

    colours: uint8 P×3 pool; each disc takes a uniformly drawn entry. The first disc drawn lies
    on top (dead leaves fall *under* the ones already seen); the uncovered rest of the plane
    takes one more pool colour.
    """
    big = size * SUPERSAMPLE
    radii = sample_radii(num_discs, g) * big
    centres = (torch.rand(num_discs, 2, generator=g, dtype=torch.float64) * (1 + 2 * MARGIN)
               - MARGIN) * big
    pick = torch.randint(0, colours.shape[0], (num_discs + 1,), generator=g)
    palette = colours[pick].double()  # (D+1)×3, last = background
    coords = torch.arange(big, dtype=torch.float64) + 0.5
    dy = coords.view(1, big, 1) - centres[:, 0].view(-1, 1, 1)
    dx = coords.view(1, 1, big) - centres[:, 1].view(-1, 1, 1)
    inside = dy * dy + dx * dx <= (radii * radii).view(-1, 1, 1)  # D×big×big
    covered = torch.cat([inside, torch.ones(1, big, big, dtype=torch.bool)])
    # Index of the first (topmost) covering disc per pixel; a min over indices is ~2× faster
    # than argmax over dim 0 on CPU and gives the same answer.
    index = torch.arange(num_discs + 1, dtype=torch.int16).view(-1, 1, 1)
    top = torch.where(covered, index, num_discs).amin(0).long()
    image = palette[top].permute(2, 0, 1).unsqueeze(0)  # 1×3×big×big
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    return image[0].round_().clamp_(0, 255).to(torch.uint8)
