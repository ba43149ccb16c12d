"""The documented perturbation rule, written out independently of zomem's optimizers for float64 references."""

from __future__ import annotations

import math

import torch

from zomem.optim import mix


def reference_z(step_seed: int, j: int, shape: tuple[int, ...], block: int | None) -> torch.Tensor:
    """z of tensor j at step seed s: block k drawn from a generator seeded mix(s, j, k)."""
    n = math.prod(shape)
    size = block or n
    pieces = []
    for k, start in enumerate(range(0, n, size)):
        generator = torch.Generator().manual_seed(mix(step_seed, j, k))
        pieces.append(torch.empty(min(size, n - start), dtype=torch.float64).normal_(generator=generator))
    return torch.cat(pieces).view(shape)
