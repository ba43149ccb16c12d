"""LOZO and LOZO-M (Chen et al., ICLR 2025): zeroth-order SGD along low-rank perturbations U·Vᵀ of each weight
matrix,
with V shared by ν consecutive steps (lazy sampling); LOZO-M keeps its momentum in that low-rank space."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from zomem.optim.base import Block, check_positive, check_state_dtype, one_thread
from zomem.optim.lowrank import LowRank, check_interval, check_rank

#: the block index under which a matrix's V is drawn (its blocks of rows are 0, 1, …)
RIGHT = -1
#: the authors' rank and interval for OPT (their README's OPT-13B example)
RANK, INTERVAL = 2, 50


class LazyFactors(LowRank):
    """LOZO's perturbation of a weight matrix X (m × n): U·Vᵀ with U ~ N(0, I) (m × r) fresh each step and
    V ~ N(0, I)
    (n × r) redrawn every ν steps (``interval``), regenerated from the seed of the step that drew it: never stored."""

    def __init__(self, params: Any, defaults: dict[str, Any], *, seed: int,
                 block_size: int | str | None) -> None:
        check_positive("lr", defaults["lr"], allow_zero=True)
        check_positive("eps", defaults["eps"])
        super().__init__(params, {**defaults, "rank": check_rank(defaults["rank"]),
                                  "interval": check_interval("interval", defaults["interval"])},
                         seed=seed, block_size=block_size)
        self._right_seed = 0

    def begin(self) -> tuple[int, int]:
        """Start a step: its index t and seed, with V's seed set to that of the step that last redrew V."""
        t = self.step_count
        self._right_seed = self.step_seed(t - t % self.defaults["interval"])
        return t, self.next_step_seed()

    def left(self, out: torch.Tensor, b: Block, step_seed: int) -> None:
        """Block ``b``'s rows of U, fresh each step."""
        self.draw(out, step_seed, b.index, b.block)

    def right(self, out: torch.Tensor, b: Block) -> None:
        """V, regenerated from its refresh step's seed."""
        self.draw(out, self._right_seed, b.index, RIGHT)


class LOZO(LazyFactors):
    """LOZO: probe each weight matrix X along U·Vᵀ (U every step, V every ν), other tensors along z; keeps nothing.

    With U, V as :class:`LazyFactors` draws them:

    c = (L(X + ε·UVᵀ) − L(X − ε·UVᵀ))/2ε;  X −= η·c·UVᵀ/r;  other tensors θ −= η·c·z (MeZO).

    E[c·UVᵀ/r] is the gradient as ε → 0. The walk draws r numbers per row of a matrix instead of n.
    """

    def __init__(self, params: Any, lr: float = 2e-7, eps: float = 1e-3, rank: int = RANK, interval: int = INTERVAL,
                 *, seed: int = 0, block_size: int | str | None = "auto") -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "rank": rank, "interval": interval}, seed=seed,
                         block_size=block_size)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        _, seed = self.begin()
        rank = self.defaults["rank"]
        # a matrix's estimate is c·UVᵀ/r: its step divides g by the rank
        return self.descend(closure, seed, lambda b, grad: grad / rank if b.param.ndim == 2 else grad)


class LOZOMomentum(LazyFactors):
    """LOZO-M: LOZO whose momentum lives in the low-rank space: N (m × r) per matrix, m (like θ) per other tensor.

    With c, U, V as in LOZO, and N = 0, m = 0 at the start:

    N ← β·Ñ + (1−β)·c·U;  X −= η·N·Vᵀ/r, where Ñ = N, or N·V_oldᵀV/n when V has just been redrawn
    (the momentum
    carried into the new subspace); other tensors m ← β·m + (1−β)·c·z;  θ −= η·m.

    Keeps N for each matrix and m for the others: a few thousandths of the parameters (:meth:`state_elements`).
    """

    update_buffers: ClassVar[int] = 2  # the block's perturbation, and its rows of N·Vᵀ

    def __init__(self, params: Any, lr: float = 2e-7, eps: float = 1e-3, rank: int = RANK, interval: int = INTERVAL,
                 momentum: float = 0.9, state_dtype: str | torch.dtype | None = None, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum: {momentum} (must be in [0, 1))")
        super().__init__(params, {"lr": lr, "eps": eps, "rank": rank, "interval": interval, "momentum": momentum,
                                  "state_dtype": check_state_dtype(state_dtype)}, seed=seed, block_size=block_size)

    @staticmethod
    def state_elements(shapes: Sequence[tuple[int, ...]], hparams: dict[str, Any]) -> int:
        """Elements of the state kept for parameters of ``shapes`` (read by the estimator): m·r per matrix, the whole
        tensor otherwise."""
        rank = hparams.get("rank", RANK)
        return sum(shape[0] * rank if len(shape) == 2 else math.prod(shape) for shape in shapes)

    def _carry(self, b: Block, old_seed: int) -> torch.Tensor:
        """V_oldᵀV/n (r × r) for block ``b``'s matrix, V_old regenerated from ``old_seed``."""
        _, right = self.factors
        old = self._buffer(right.device, right.dtype, right.numel(), "old")[: right.numel()].view_as(right)
        self.draw(old, old_seed, b.index, RIGHT)
        return old.T @ right / right.shape[0]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        t, seed = self.begin()
        eps, rank, beta, interval = (self.defaults[k] for k in ("eps", "rank", "momentum", "interval"))
        redrawn, old_seed = t > 0 and t % interval == 0, self.step_seed(t - interval)
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        carry = None
        with self.phase("update"), one_thread():
            for b in self.blocks(seed):
                b.x.add_(b.z, alpha=eps)  # restore θ
                if b.param.ndim != 2:
                    stored = self.state_block(b, "momentum")
                    m = self.working(b, "momentum", stored)
                    m.mul_(beta).add_(b.z, alpha=(1 - beta) * grad)
                    self.store(stored, m)
                    b.x.add_(m, alpha=-b.group["lr"])
                    continue
                left, right = self.factors
                rows, cols = left.shape[0], right.shape[0]
                if redrawn and b.block == 0:
                    carry = self._carry(b, old_seed)
                first = b.span.start // cols
                stored = self.state_tensor(b.param, b.group, "momentum", (b.param.shape[0], rank))[first:first + rows]
                n = stored.to(left.dtype, copy=True)  # a block's rows of N: rows × r, small
                if carry is not None:
                    n = n @ carry
                n.mul_(beta).add_(left, alpha=(1 - beta) * grad)
                stored.copy_(n)
                step = torch.mm(n, right.T, out=self.scratch(b, "step").view(rows, cols))
                b.x.add_(step.view(-1), alpha=-b.group["lr"] / rank)
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus
