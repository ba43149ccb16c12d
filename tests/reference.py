"""The documented rules, written out independently of zomem's optimizers for float64 references: how z is drawn, and
where a step stores what it computes (parameters and state in their own dtypes; everything else in float64)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zomem.optim import mix


def reference_z(step_seed: int, j: int, shape: tuple[int, ...], block: int | None,
                dtype: torch.dtype = torch.float64, signs: bool = False) -> torch.Tensor:
    """z of tensor j at step seed s: block k drawn in ``dtype`` from a generator seeded mix(s, j, k), as float64;
    N(0, 1), or with ``signs`` Rademacher (−1 or 1, FZOO's)."""
    n = math.prod(shape)
    size = block or n
    pieces = []
    for k, start in enumerate(range(0, n, size)):
        generator = torch.Generator().manual_seed(mix(step_seed, j, k))
        piece = torch.empty(min(size, n - start), dtype=dtype)
        pieces.append(piece.random_(0, 2, generator=generator) * 2 - 1 if signs else piece.normal_(generator=generator))
    return torch.cat(pieces).double().view(shape)


def gaussian(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """N(0, 1) of ``shape`` drawn whole in ``dtype`` from one generator seeded ``seed`` (a low-rank factor), as
    float64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=dtype).normal_(generator=generator).double()


@dataclass(frozen=True)
class Numerics:
    """Pure precision as a reference sees it: parameters stored in ``param``, state in ``state`` (default: the
    parameters' dtype), z drawn in the compute dtype (float32, or float64 when either dtype is), and every other
    quantity exact (float64)."""

    param: torch.dtype = torch.float64
    state: torch.dtype | None = None

    @property
    def state_dtype(self) -> torch.dtype:
        return self.state or self.param

    @property
    def draw(self) -> torch.dtype:
        return torch.float64 if torch.float64 in (self.param, self.state_dtype) else torch.float32

    def store(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Parameters as stored: rounded to their dtype."""
        return [t.to(self.param).double() for t in tensors]

    def keep(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """State as stored: rounded to the state dtype."""
        return [t.to(self.state_dtype).double() for t in tensors]

    def zs(self, step_seed: int, shapes: list[tuple[int, ...]], block: int | None) -> list[torch.Tensor]:
        """Every tensor's z at ``step_seed``, drawn in the compute dtype."""
        return [reference_z(step_seed, j, shape, block, self.draw) for j, shape in enumerate(shapes)]


FLOAT64 = Numerics()
