"""Forward gradient (Baydin et al., 2022): one forward-mode JVP along a random tangent instead of backprop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from zomem.optim.base import ZerothOrder, check_positive


class ForwardGrad(ZerothOrder):
    """Forward gradient: one JVP along a seeded tangent v ~ N(0, I) gives ∇L·v; θ −= η·(∇L·v)·v. Keeps nothing.

    The tangents are attached to the parameters themselves, so any closure works unchanged: no access to the
    module is needed. They are all alive during the forward (1P transient); nothing is kept between steps.
    """

    def __init__(self, params: Any, lr: float = 1e-6, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        super().__init__(params, {"lr": lr}, seed=seed, block_size=block_size)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed = self.next_step_seed()
        with self.phase("perturb"):
            tangents = []
            for j, group, param in self.params():
                tangent = torch.empty_like(param, memory_format=torch.contiguous_format)
                for k, span in enumerate(self.spans(param, group)):
                    self.draw(tangent.view(-1)[span], seed, j, k)
                tangents.append(tangent)
        # Forward AD is not implemented for the fused attention kernels (CPU flash, CUDA flash/efficient): use math.
        with fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
            for (_, _, param), tangent in zip(self.params(), tangents, strict=True):
                # Copying a dual view of itself into the parameter gives it the tangent for this level only.
                param.copy_(fwAD.make_dual(param.detach(), tangent))
            loss, directional = fwAD.unpack_dual(closure())
        jvp = 0.0 if directional is None else float(directional)
        with self.phase("update"):
            for (_, group, param), tangent in zip(self.params(), tangents, strict=True):
                param.add_(tangent, alpha=-group["lr"] * jvp)
        self.state["global"]["projected_grad"] = jvp
        return loss
