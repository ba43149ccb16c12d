"""ZO-SGD variants benchmarked with MeZO (Zhang et al., 2024, "Revisiting Zeroth-Order Optimization for
Memory-Efficient LLM Fine-Tuning"): momentum, sign and conservative steps on the two-point estimate g·z."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from zomem.optim.base import ZerothOrder, check_positive, check_state_dtype, one_thread


class ZOSGDMomentum(ZerothOrder):
    """ZO-SGD with momentum: g = (L+ − L−)/2ε; m = μm + g·z; θ −= η·m. Keeps m (1P)."""

    state_copies: ClassVar[float] = 1.0
    update_buffers: ClassVar[int] = 2  # z, and m in float32 when the state is half

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, momentum: float = 0.9,
                 state_dtype: str | torch.dtype | None = None, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum: {momentum} (must be in [0, 1))")
        super().__init__(params, {"lr": lr, "eps": eps, "momentum": momentum,
                                  "state_dtype": check_state_dtype(state_dtype)}, seed=seed, block_size=block_size)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed, eps = self.next_step_seed(), self.defaults["eps"]
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        with self.phase("update"):
            for b in self.blocks(seed):
                b.x.add_(b.z, alpha=eps)  # restore θ
                stored = self.state_block(b, "momentum")
                m = self.working(b, "momentum", stored)
                m.mul_(b.group["momentum"]).add_(b.z, alpha=grad)
                self.store(stored, m)
                b.x.add_(m, alpha=-b.group["lr"])
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus


class ZOSGDSign(ZerothOrder):
    """ZO-SignSGD: g = (L+ − L−)/2ε; θ −= η·sign(g·z). Keeps nothing between steps."""

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        super().__init__(params, {"lr": lr, "eps": eps}, seed=seed, block_size=block_size)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed, eps = self.next_step_seed(), self.defaults["eps"]
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        sign = (grad > 0) - (grad < 0)
        with self.phase("update"), one_thread():
            for b in self.blocks(seed):
                b.x.add_(b.z, alpha=eps)  # restore θ
                b.x.add_(b.z.sign_(), alpha=-b.group["lr"] * sign)  # sign(g·z) = sign(g)·sign(z)
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus


class ZOSGDConservative(ZerothOrder):
    """ZO-SGD-Cons: g from L± as in MeZO, then evaluate θ, θ − ηg·z, θ + ηg·z and keep the best
    (5 forwards)."""

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        super().__init__(params, {"lr": lr, "eps": eps}, seed=seed, block_size=block_size)

    def _move(self, step_seed: int, eps_coef: float, lr_coef: float) -> None:
        # θ += (eps_coef·ε + lr_coef·η)·z: the learning rate may differ between parameter groups.
        with self.phase("update"), one_thread():
            for b in self.blocks(step_seed):
                b.x.add_(b.z, alpha=eps_coef * self.defaults["eps"] + lr_coef * b.group["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed, eps = self.next_step_seed(), self.defaults["eps"]
        loss0 = closure()
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        self._move(seed, 1.0, -grad)  # restore θ and step to θ − ηg·z in one regeneration
        loss_descent = closure()
        self._move(seed, 0.0, 2 * grad)  # θ + ηg·z
        loss_ascent = closure()
        # Keep the lowest of the three; ties favour a move (+ηg·z, then −ηg·z), as in the authors' code.
        candidates = [(float(loss_ascent), 1), (float(loss_descent), -1), (float(loss0), 0)]
        best = min(candidates, key=lambda c: c[0])[1]
        if best != 1:
            self._move(seed, 0.0, (best - 1) * grad)
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss0
