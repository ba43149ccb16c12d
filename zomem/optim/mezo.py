"""MeZO (Malladi et al., 2023): zeroth-order SGD with a two-point SPSA estimate and no state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zomem.optim.base import ZerothOrder, check_positive, one_thread


class MeZO(ZerothOrder):
    """θ+εz → L+; θ−2εz → L−; θ+εz; g = (L+ − L−)/2ε; θ −= η(g·z + λθ).
    Keeps nothing between steps."""

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, seed: int = 0, block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay},
                         seed=seed, block_size=block_size)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed, eps = self.next_step_seed(), self.defaults["eps"]
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        # Restoring θ and updating it share one regeneration of z per block, and without decay one add.
        with self.phase("update"), one_thread():
            for b in self.blocks(seed):
                lr, decay = b.group["lr"], b.group["weight_decay"]
                if not decay:
                    b.x.add_(b.z, alpha=eps - lr * grad)
                    continue
                b.x.add_(b.z, alpha=eps)
                b.x.mul_(1 - lr * decay)
                b.x.add_(b.z, alpha=-lr * grad)
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus
