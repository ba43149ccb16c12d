"""MeZO-SVRG (Gautam et al., 2024): MeZO with an SVRG control variate around a periodically retaken snapshot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from zomem.optim.base import ZerothOrder, check_positive, check_state_dtype, mix, one_thread
from zomem.optim.lowrank import check_interval

#: the stream of a step's seed from which the estimate at the snapshot draws its z′
SNAPSHOT_STREAM = 1


class MeZOSVRG(ZerothOrder):
    """MeZO-SVRG: MeZO with a control variate around a snapshot θ̄ retaken every q steps; keeps θ̄ and ḡ (2P).

    ĝ(x; z) = (L(x + εz) − L(x − εz))/2ε · z, each estimate with its own z ~ N(0, I). At step t:

    t mod q = 0:  ḡ ← ĝ(θ; z̄);  θ̄ ← θ;  θ −= η̄·ḡ   (2 forwards)
    otherwise:    θ −= η·(ĝ(θ; z) − ĝ(θ̄; z′) + ḡ)   (4 forwards)

    η̄ is ``snapshot_lr``. ḡ is the snapshot's estimate on the cell's batch, which stands for the paper's full
    batch. The forwards at θ̄ ± εz′ swap θ̄ into the parameters and θ into the snapshot's storage, block by
    block, and swap
    them back in the update: no third copy is made.
    """

    state_copies: ClassVar[float] = 2.0
    forward_buffers: ClassVar[int] = 3  # z, z′ and a block in transit between θ and θ̄
    update_buffers: ClassVar[int] = 3

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, snapshot_lr: float = 1e-5, q: int = 2,
                 state_dtype: str | torch.dtype | None = None, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("snapshot_lr", snapshot_lr, allow_zero=True)
        check_positive("eps", eps)
        super().__init__(params, {"lr": lr, "eps": eps, "snapshot_lr": snapshot_lr, "q": check_interval("q", q),
                                  "state_dtype": check_state_dtype(state_dtype)}, seed=seed, block_size=block_size)

    @torch.no_grad()
    def snapshot(self, closure: Callable[[], torch.Tensor], seed: int) -> torch.Tensor:
        """ḡ ← ĝ(θ; z̄); θ̄ ← θ; θ −= η̄·ḡ."""
        eps = self.defaults["eps"]
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        with self.phase("update"), one_thread():
            for b in self.blocks(seed):
                b.x.add_(b.z, alpha=eps)  # restore θ
                self.state_block(b, "snapshot").copy_(b.x)
                estimate = torch.mul(b.z, grad, out=self.scratch(b, "estimate"))
                self.state_block(b, "estimate").copy_(estimate)
                b.x.add_(estimate, alpha=-b.group["snapshot_lr"])
        return loss_plus

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        t, seed, eps = self.step_count, self.next_step_seed(), self.defaults["eps"]
        if t % self.defaults["q"] == 0:
            loss = self.snapshot(closure, seed)
            self.release_buffers()
            return loss
        other = mix(seed, SNAPSHOT_STREAM)
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        # θ − εz in the parameters becomes θ̄ + εz′, and θ goes into the snapshot's storage
        with self.phase("perturb"), one_thread():
            for b in self.blocks(seed):
                snapshot = self.state_block(b, "snapshot")
                moving = self.scratch(b, "transit", like=b.x).add_(b.z, alpha=eps)
                b.x.copy_(snapshot).add_(self.draw(self.scratch(b, "other"), other, b.index, b.block), alpha=eps)
                snapshot.copy_(moving)
        snapshot_plus = closure()
        self.perturb(other, -2 * eps)
        snapshot_grad = (float(snapshot_plus) - float(closure())) / (2 * eps)
        with self.phase("update"), one_thread():
            for b in self.blocks(seed):
                snapshot, estimate = self.state_block(b, "snapshot"), self.state_block(b, "estimate")
                other_z = self.draw(self.scratch(b, "other"), other, b.index, b.block)
                moving = self.scratch(b, "transit", like=b.x).add_(other_z, alpha=eps)  # θ̄
                step = other_z.mul_(-snapshot_grad).add_(b.z, alpha=grad).add_(estimate)
                b.x.copy_(snapshot).add_(step, alpha=-b.group["lr"])
                snapshot.copy_(moving)
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus
