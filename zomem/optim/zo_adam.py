"""ZO-Adam: Adam's moments on the two-point zeroth-order estimate g·z (ZO-AdaMM style, Chen et al., 2019)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from zomem.optim.base import ZerothOrder, check_positive, check_state_dtype


def check_betas(betas: tuple[float, float]) -> tuple[float, float]:
    """Two decay rates in [0, 1), or a ValueError naming them."""
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas!r} (two values in [0, 1))")
    return float(betas[0]), float(betas[1])


class ZOAdam(ZerothOrder):
    """g = (L+ − L−)/2ε; m = β1·m + (1−β1)·g·z; v = β2·v + (1−β2)·(g·z)²;
    θ −= η·m̂/(√v̂ + adam_eps). Keeps m, v (2P).

    m̂, v̂ are Adam's bias-corrected moments. ZO-AdaMM's max(v̂) would be a third copy; the spec keeps 2P.
    """

    state_copies: ClassVar[float] = 2.0
    update_buffers: ClassVar[int] = 4  # z, the denominator, and m, v in float32 when the state is half

    def __init__(self, params: Any, lr: float = 1e-5, eps: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, state_dtype: str | torch.dtype | None = None, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        check_positive("adam_eps", adam_eps)
        super().__init__(params, {"lr": lr, "eps": eps, "betas": check_betas(betas), "adam_eps": adam_eps,
                                  "state_dtype": check_state_dtype(state_dtype)}, seed=seed, block_size=block_size)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed, eps = self.next_step_seed(), self.defaults["eps"]
        t = self.step_count
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        with self.phase("update"):
            for b in self.blocks(seed):
                b.x.add_(b.z, alpha=eps)  # restore θ
                beta1, beta2 = b.group["betas"]
                m_state, v_state = self.state_block(b, "exp_avg"), self.state_block(b, "exp_avg_sq")
                m, v = self.working(b, "m", m_state), self.working(b, "v", v_state)
                m.mul_(beta1).add_(b.z, alpha=(1 - beta1) * grad)
                v.mul_(beta2).addcmul_(b.z, b.z, value=(1 - beta2) * grad * grad)
                self.store(m_state, m)
                self.store(v_state, v)
                # √v̂ + adam_eps, in a scratch buffer so no other temporary is made
                denom = torch.sqrt(v, out=self.scratch(b, "denom"))
                denom.div_((1 - beta2**t) ** 0.5).add_(b.group["adam_eps"])
                b.x.addcdiv_(m, denom, value=-b.group["lr"] / (1 - beta1**t))
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus
