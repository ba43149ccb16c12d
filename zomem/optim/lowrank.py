"""What the low-rank zeroth-order methods (LOZO, SubZero) share: a weight matrix is perturbed along a product of thin
factors L·Rᵀ, walked in blocks of whole rows, so a block's perturbation is its rows of L times Rᵀ and only the
factors
are ever drawn. Other tensors (biases, LayerNorms) are perturbed as MeZO perturbs them."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from zomem.optim.base import Block, ZerothOrder, check_positive


def check_rank(rank: int) -> int:
    """A factor rank: a whole number >= 1, or a ValueError naming it."""
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise ValueError(f"invalid rank: {rank!r} (a whole number >= 1)")
    return rank


def check_interval(name: str, interval: int) -> int:
    """A number of steps between refreshes: a whole number >= 1, or a ValueError naming it."""
    check_positive(name, interval)
    if not (isinstance(interval, int) and not isinstance(interval, bool)):
        raise ValueError(f"invalid {name}: {interval!r} (a whole number of steps >= 1)")
    return interval


class LowRank(ZerothOrder):
    """Base class: a 2-D parameter's perturbation is L·Rᵀ (m × r and n × r factors); subclasses say what they are.

    A block of a matrix is whole rows (as many as fit in ``block_size`` elements, at least one), so the walk's buffers
    stay block-sized: z's buffer receives the block's rows of L·Rᵀ, beside those rows of L and R itself.
    """

    #: the factors of the block the walk is on (its rows of L, and R), for an update that needs them apart
    factors: tuple[torch.Tensor, torch.Tensor]
    #: L·Rᵀ is built from the whole matrix's factors, not element by element
    shardable: ClassVar[bool] = False

    @staticmethod
    def spans(param: torch.Tensor, group: dict[str, Any]) -> list[slice]:
        """Matrices in blocks of whole rows; other tensors as :meth:`ZerothOrder.spans`."""
        if param.ndim != 2:
            return ZerothOrder.spans(param, group)
        rows, cols = param.shape
        per = max(1, ZerothOrder.spans(param, group)[0].stop // cols)  # as many rows as a block's elements hold
        return [slice(start * cols, min(start + per, rows) * cols) for start in range(0, rows, per)]

    def rank_of(self, param: torch.Tensor) -> int:
        """The factors' rank for the matrix ``param``."""
        return self.defaults["rank"]

    def release_buffers(self) -> None:
        """Drop the walk's buffers, the factors' views of them included."""
        super().release_buffers()
        self.factors = ()  # type: ignore[assignment]

    def left(self, out: torch.Tensor, b: Block, step_seed: int) -> None:
        """Write block ``b``'s rows of L at ``step_seed`` into ``out`` (rows × rank)."""
        raise NotImplementedError

    def right(self, out: torch.Tensor, b: Block) -> None:
        """Write the right factor R of ``b``'s tensor this step into ``out`` (columns × rank)."""
        raise NotImplementedError

    def sample(self, b: Block, step_seed: int) -> None:
        """A matrix block's rows of L·Rᵀ (R is formed at the tensor's first block and kept for the others); any other
        tensor's z."""
        if b.param.ndim != 2:
            super().sample(b, step_seed)
            return
        cols, rank = b.param.shape[1], self.rank_of(b.param)
        rows = b.z.numel() // cols
        right = self._buffer(b.z.device, b.z.dtype, cols * rank, "right")[: cols * rank].view(cols, rank)
        if b.block == 0:
            self.right(right, b)
        left = self._buffer(b.z.device, b.z.dtype, rows * rank, "left")[: rows * rank].view(rows, rank)
        self.left(left, b, step_seed)
        self.factors = (left, right)
        torch.mm(left, right.T, out=b.z.view(rows, cols))
