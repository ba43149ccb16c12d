"""FZOO (2025): N one-sided Rademacher probes per step, the step normalised by the spread of their losses."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from zomem.optim.base import ZerothOrder, check_positive, mix, one_thread


class FZOO(ZerothOrder):
    """FZOO: N one-sided probes along Rademacher vectors u_i ∈ {−1, 1}^d, step normalised by their losses' spread.

    With u_i drawn from seed mix(s, i) (i = 0…N−1), L₀ = L(θ) and L_i = L(θ + ε·u_i):

    σ = std(L_1…L_N) (population);  θ −= η/(N·σ) · Σ_i (L_i − L₀)·u_i  (no step when σ = 0).

    Dividing by σ ≈ ε·|∇L| makes it a normalised-SGD step. N + 1 forwards per step, run one after another; keeps
    nothing. The update regenerates the N vectors block by block and sums them in one buffer.
    """

    update_buffers: ClassVar[int] = 2  # u_i, and the sum

    def __init__(self, params: Any, lr: float = 5e-5, eps: float = 1e-4, probes: int = 8, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        if not (isinstance(probes, int) and not isinstance(probes, bool) and probes >= 2):
            raise ValueError(f"invalid probes: {probes!r} (a whole number >= 2: σ needs two losses)")
        super().__init__(params, {"lr": lr, "eps": eps, "probes": probes}, seed=seed, block_size=block_size)

    def draw(self, out: torch.Tensor, step_seed: int, index: int, block: int) -> torch.Tensor:
        """A Rademacher block: each element −1 or 1 with equal probability."""
        generator = self._generator(out.device)
        generator.manual_seed(mix(step_seed, index, block))
        return out.random_(0, 2, generator=generator).mul_(2).sub_(1)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed, eps, n = self.next_step_seed(), self.defaults["eps"], self.defaults["probes"]
        seeds = [mix(seed, i) for i in range(n)]
        loss = closure()
        loss0, losses = float(loss), []
        for probe in seeds:
            self.perturb(probe, eps)
            losses.append(float(closure()))
            self.perturb(probe, -eps)
        spread = statistics.pstdev(losses)
        coefficients = [(value - loss0) / (n * spread) for value in losses] if spread > 0 else []
        if coefficients:
            with self.phase("update"), one_thread():
                for b in self.blocks(seeds[0]):
                    total = torch.mul(b.z, coefficients[0], out=self.scratch(b, "sum"))
                    for probe, coefficient in zip(seeds[1:], coefficients[1:], strict=True):
                        total.add_(self.draw(b.z, probe, b.index, b.block), alpha=coefficient)
                    b.x.add_(total, alpha=-b.group["lr"])
        self.state["global"]["spread"] = spread
        self.release_buffers()
        return loss
