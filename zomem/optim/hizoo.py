"""HiZOO (Zhao et al., 2024): zeroth-order SGD preconditioned by a diagonal Hessian estimated from one more forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from zomem.optim.base import Block, ZerothOrder, check_positive, check_state_dtype


class HiZOO(ZerothOrder):
    """HiZOO: probe along z/√H with a diagonal Hessian estimate H; θ −= η·g·z/√H (3 forwards). Keeps H (1P).

    H starts at 1. Per step, with z regenerated from the seed:

    L0 = L(θ); L± = L(θ ± ε·z/√H); Ĥ = |L+ + L− − 2L0| / (2ε²) · H ⊙ z²; H ← (1−α)H + αĤ;
    g = (L+ − L−)/2ε; θ −= η·g·z/√H, with the updated H (as the authors' code does).
    """

    state_copies: ClassVar[float] = 1.0
    forward_buffers: ClassVar[int] = 2  # z and √H, drawn and formed for each perturbation
    update_buffers: ClassVar[int] = 2

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, hessian_smooth: float = 1e-6,
                 state_dtype: str | torch.dtype | None = None, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        if not 0.0 <= hessian_smooth <= 1.0:
            raise ValueError(f"invalid hessian_smooth: {hessian_smooth} (must be in [0, 1])")
        super().__init__(params, {"lr": lr, "eps": eps, "hessian_smooth": hessian_smooth,
                                  "state_dtype": check_state_dtype(state_dtype)}, seed=seed, block_size=block_size)

    def _hessian(self, b: Block) -> torch.Tensor:
        return self.state_block(b, "hessian", fill=1.0)

    def _sqrt_hessian(self, b: Block) -> torch.Tensor:
        return self.scratch(b, "work", like=self._hessian(b)).sqrt_()

    def direction(self, b: Block) -> torch.Tensor:
        """z/√H: a smaller probe along directions of high curvature."""
        return b.z.div_(self._sqrt_hessian(b))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed, eps = self.next_step_seed(), self.defaults["eps"]
        loss0 = closure()
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        lp, lm, l0 = float(loss_plus), float(loss_minus), float(loss0)
        grad = (lp - lm) / (2 * eps)
        curvature = abs(lp + lm - 2 * l0) / (2 * eps * eps)
        with self.phase("update"):
            for b in self.blocks(seed):
                alpha = b.group["hessian_smooth"]
                b.x.addcdiv_(b.z, self._sqrt_hessian(b), value=eps)  # restore θ with the H it was perturbed by
                hessian = self._hessian(b)
                # (1−α)H + α·c·H⊙z² = H ⊙ (1 − α + α·c·z²), formed in the compute dtype:
                # with α ~ 1e-6 the
                # increment is far below half precision's resolution at 1
                updated = torch.mul(b.z, b.z, out=self.scratch(b, "work")).mul_(alpha * curvature).add_(1 - alpha)
                updated.mul_(hessian)
                hessian.copy_(updated)
                b.x.addcdiv_(b.z, updated.sqrt_(), value=-b.group["lr"] * grad)
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss0
