"""An optimizer defined outside zomem: MeZO with its projected gradient clipped (the README's plug-in example)."""

from collections.abc import Callable
from typing import Any

import torch

from zomem.optim import ZerothOrder


class ClippedZO(ZerothOrder):
    """MeZO whose projected gradient g is clipped to [-clip, clip]; keeps nothing between steps."""

    state_copies = 0.0  # persistent state, in copies of the trainable parameters (read by the estimator)

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, clip: float = 100.0, *,
                 seed: int = 0, block_size: int | str | None = "auto") -> None:
        if clip <= 0:
            raise ValueError(f"invalid clip: {clip} (must be > 0)")
        super().__init__(params, {"lr": lr, "eps": eps, "clip": clip}, seed=seed, block_size=block_size)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        seed, eps, clip = self.next_step_seed(), self.defaults["eps"], self.defaults["clip"]
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)  # L(θ+εz), L(θ−εz); θ is left at θ−εz
        grad = max(-clip, min(clip, (float(loss_plus) - float(loss_minus)) / (2 * eps)))
        with self.phase("update"):
            for b in self.blocks(seed):  # z regenerated block by block from the step seed
                b.x.add_(b.z, alpha=eps - b.group["lr"] * grad)  # restore θ and step in one pass
        self.release_buffers()
        return loss_plus
