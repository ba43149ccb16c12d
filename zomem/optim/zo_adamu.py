"""ZO-AdaMU (Jiang et al., 2024): zeroth-order SGD whose perturbation carries momentum and an annealed variance."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from zomem.optim.base import Block, ZerothOrder, check_positive, check_state_dtype, mix

#: (α, β1, β2) of a step: noise split, perturbation momentum, variance momentum
Coefficients = tuple[float, float, float]
Schedule = Callable[[int], Coefficients]
#: the values the schedule settles at from T2 on
FINAL: Coefficients = (0.5, 0.9, 0.01)
#: z̈'s noise is drawn by the same rule as ż, from step seed mix(s, NOISE_STREAM)
NOISE_STREAM = 1


def anneal(t: int, t1: float, t2: float, final: Coefficients = FINAL) -> Coefficients:
    """(α, β1, β2) at step t: 1 before T1 (warm-up), a half cosine from 1 to ``final`` until T2, then ``final``.

    The paper's printed formula is not well defined; this is the reading SPEC §4 documents.
    """
    if t < t1:
        return 1.0, 1.0, 1.0
    if t >= t2:
        return final
    weight = (1 + math.cos(math.pi * (t - t1) / (t2 - t1))) / 2  # 1 at T1, 0 at T2
    alpha, beta1, beta2 = (f + (1 - f) * weight for f in final)
    return alpha, beta1, beta2


class ZOAdaMU(ZerothOrder):
    """ZO-AdaMU: probe along m = β1·ż + (1−β1)·z̈ (momentum h, annealed noise); θ −= η·g·m/√(v+σ).
    Keeps h (1P).

    At step t, with (α, β1, β2) = schedule(t):

    ż ~ N(0, α·I), z̈ ~ N(h, (1−α)·I); m = β1·ż + (1−β1)·z̈; v = β2·ż² + (1−β2)·z̈²;
    g = (L(θ+εm) − L(θ−εm))/2ε; θ −= η·g·m/√(v+σ); h ← m.

    SPEC's N(0, √α·I) is read as standard deviation √α (the authors' code), so ż's and z̈'s noises add to unit
    variance. ``schedule`` replaces :func:`anneal`; it is code, not state: pass it again when resuming.
    """

    state_copies: ClassVar[float] = 1.0
    forward_buffers: ClassVar[int] = 2  # ż and z̈ (z̈'s noise is drawn once the warm-up is over)
    update_buffers: ClassVar[int] = 3  # ż, z̈ and v

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, total_steps: int = 20_000, t1: float = 1024,
                 t2: float | None = None, sigma: float = 1e-8, state_dtype: str | torch.dtype | None = None,
                 schedule: Schedule | None = None, *, seed: int = 0, block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        check_positive("sigma", sigma)
        check_positive("total_steps", total_steps)
        t2 = 0.8 * total_steps if t2 is None else t2
        if not 0 <= t1 < t2 <= total_steps:
            raise ValueError(f"invalid schedule: t1={t1}, t2={t2}, total_steps={total_steps} "
                             "(need 0 <= t1 < t2 <= total_steps)")
        super().__init__(params, {"lr": lr, "eps": eps, "total_steps": total_steps, "t1": t1, "t2": t2,
                                  "sigma": sigma, "state_dtype": check_state_dtype(state_dtype)},
                         seed=seed, block_size=block_size)
        self.schedule: Schedule = schedule or functools.partial(anneal, t1=t1, t2=t2)
        self._coefficients: Coefficients = (1.0, 1.0, 1.0)
        self._noise_seed = 0

    def _parts(self, b: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """ż (in the z buffer) and z̈ of block ``b`` this step."""
        alpha = self._coefficients[0]
        h = self.state_block(b, "perturbation_momentum")
        z_dot = b.z.mul_(math.sqrt(alpha))
        if alpha == 1.0:
            return z_dot, h  # z̈ ~ N(h, 0) is h itself: the warm-up draws no second noise
        z_ddot = self.draw(self.scratch(b, "noise"), self._noise_seed, b.index, b.block)
        return z_dot, z_ddot.mul_(math.sqrt(1 - alpha)).add_(h)

    def direction(self, b: Block) -> torch.Tensor:
        """m = β1·ż + (1−β1)·z̈."""
        z_dot, z_ddot = self._parts(b)
        beta1 = self._coefficients[1]
        return z_dot.mul_(beta1).add_(z_ddot, alpha=1 - beta1)

    def reach_steady_state(self) -> None:
        """Move the step counter just past T1, into the annealed phase: its steps draw z̈'s noise as well, which
        the SPSA warm-up (α = 1 up to and at T1) does not. The perturbation momentum h is untouched (zero until a
        step sets it; its size, 1P, is the same)."""
        self.state["global"]["step"] = max(self.step_count, math.floor(self.defaults["t1"]) + 1)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        self._coefficients = self.schedule(self.step_count)
        seed, eps = self.next_step_seed(), self.defaults["eps"]
        self._noise_seed = mix(seed, NOISE_STREAM)
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        _, beta1, beta2 = self._coefficients
        with self.phase("update"):
            for b in self.blocks(seed):
                z_dot, z_ddot = self._parts(b)
                v = torch.mul(z_dot, z_dot, out=self.scratch(b, "v")).mul_(beta2)
                v.addcmul_(z_ddot, z_ddot, value=1 - beta2)
                m = z_dot.mul_(beta1).add_(z_ddot, alpha=1 - beta1)
                b.x.add_(m, alpha=eps)  # restore θ
                self.state_block(b, "perturbation_momentum").copy_(m)  # h ← m
                b.x.addcdiv_(m, v.add_(b.group["sigma"]).sqrt_(), value=-b.group["lr"] * grad)
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus
