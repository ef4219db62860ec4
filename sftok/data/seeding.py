"""Seeds derived from tuples of integers, identical on every machine and Python version.

Python's `hash()` is salted per process and `random` differs between versions, so derived seeds
use SplitMix64 (Steele et al., 2014) over the integers instead. Every random draw in the data
package comes from a `torch.Generator` seeded this way; CPU generators give the same stream on
every platform.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 63-bit seed from integers, e.g. mix(seed, epoch, index); order matters."""
    h = 0x243F6A8885A308D3  # any fixed non-zero start
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1  # torch.Generator.manual_seed wants a value that fits in int64


def generator(*values: int) -> torch.Generator:
    """A CPU generator seeded with mix(*values)."""
    return torch.Generator().manual_seed(mix(*values))
