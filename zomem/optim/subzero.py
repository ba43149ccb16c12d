"""SubZero (Yu et al., 2024): zeroth-order SGD in random subspaces, each weight matrix perturbed along U·Z·Vᵀ."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from zomem.optim.base import Block, check_positive, check_state_dtype
from zomem.optim.lowrank import LowRank, check_interval, check_rank

#: the block indices under which a refresh draws the Gaussian matrices that QR turns into U and V, and under which a
#: step draws its core Z (a matrix's blocks of rows are 0, 1, …)
LEFT, RIGHT, CORE = -1, -2, -3
#: the authors' rank and refresh interval (their README's OPT-1.3B example)
RANK, INTERVAL = 24, 1000


class SubZero(LowRank):
    """SubZero: probe each weight matrix X (m × n) along s·U·Z·Vᵀ, other tensors along z; keeps U and V.

    U (m × r) and V (n × r) have orthonormal columns (QR of Gaussian matrices) and are redrawn every T0 steps
    (``interval``); Z ~ N(0, I) (r × r) is fresh each step; s = √(mn)/r makes E[c·s·UZVᵀ] the gradient
    as ε → 0:

    c = (L(X + ε·s·UZVᵀ) − L(X − ε·s·UZVᵀ))/2ε;  X −= η·c·s·UZVᵀ;
    other tensors θ −= η·c·z (MeZO).

    U and V are kept, (m + n)·r elements per matrix (:meth:`state_elements`), not regenerated: QR orthonormalises a
    whole factor at once, so a factor cannot be drawn block by block as z is, and regenerating both would take a QR of
    every matrix's factors in each of a step's three walks. r is capped at min(m, n).
    """

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, rank: int = RANK, interval: int = INTERVAL,
                 state_dtype: str | torch.dtype | None = None, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        super().__init__(params, {"lr": lr, "eps": eps, "rank": check_rank(rank),
                                  "interval": check_interval("interval", interval),
                                  "state_dtype": check_state_dtype(state_dtype)}, seed=seed, block_size=block_size)

    @staticmethod
    def state_elements(shapes: Sequence[tuple[int, ...]], hparams: dict[str, Any]) -> int:
        """Elements of the state kept for parameters of ``shapes`` (read by the estimator): (m + n)·r per matrix."""
        rank = hparams.get("rank", RANK)
        return sum((shape[0] + shape[1]) * min(rank, *shape) for shape in shapes if len(shape) == 2)

    def rank_of(self, param: torch.Tensor) -> int:
        """r, capped at the matrix's smaller side (QR gives no more orthonormal columns)."""
        return min(self.defaults["rank"], *param.shape)

    def redraw(self, step_seed: int) -> None:
        """New subspaces: U, V = the Q of QR of Gaussian matrices drawn from ``step_seed``, for every matrix."""
        with self.phase("regenerate"):
            for j, group, param in self.params():
                if param.ndim != 2:
                    continue
                rank = self.rank_of(param)
                for key, side, stream in (("left", param.shape[0], LEFT), ("right", param.shape[1], RIGHT)):
                    gaussian = self.draw(torch.empty(side, rank, dtype=self.working_dtype(param, group),
                                                     device=param.device), step_seed, j, stream)
                    self.state_tensor(param, group, key, (side, rank)).copy_(torch.linalg.qr(gaussian).Q)

    def left(self, out: torch.Tensor, b: Block, step_seed: int) -> None:
        """Block ``b``'s rows of s·U·Z (Z drawn at the matrix's first block and kept for the others)."""
        rank = out.shape[1]
        core = self._buffer(out.device, out.dtype, rank * rank, "core")[: rank * rank].view(rank, rank)
        if b.block == 0:
            m, n = b.param.shape
            self.draw(core, step_seed, b.index, CORE).mul_(math.sqrt(m * n) / rank)
        first = b.span.start // b.param.shape[1]
        rows = self.state[b.param]["left"][first:first + out.shape[0]]
        torch.mm(rows.to(out.dtype), core, out=out)

    def right(self, out: torch.Tensor, b: Block) -> None:
        """V, as kept."""
        out.copy_(self.state[b.param]["right"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        t, seed = self.step_count, self.next_step_seed()
        if t % self.defaults["interval"] == 0:
            self.redraw(seed)
        return self.descend(closure, seed)
