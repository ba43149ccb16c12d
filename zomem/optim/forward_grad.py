"""Forward gradient (Baydin et al., 2022): one forward-mode JVP along a random tangent instead of backprop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from zomem.optim.base import ZerothOrder, check_positive


class ForwardGrad(ZerothOrder):
    """Forward gradient: one JVP along a seeded tangent v ~ N(0, I) gives ∇L·v; θ −= η·(∇L·v)·v.
    Keeps nothing.

    The tangents are attached to the parameters themselves, so any closure works unchanged: no access to the
    module is needed. They are all alive during the forward (1P transient); nothing is kept between steps.
    """

    #: its tangents ride on the parameters through the forward, which FSDP gathers into new tensors
    shardable: ClassVar[bool] = False

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
                # drawn in the compute dtype like every z, then stored in the parameter's dtype (a dual's tangent
                # has its primal's dtype)
                tangent = torch.empty_like(param, memory_format=torch.contiguous_format)
                spans = self.spans(param, group)
                buffer = self._buffer(param.device, self.working_dtype(param, group), spans[0].stop)
                for k, span in enumerate(spans):
                    tangent.view(-1)[span].copy_(self.draw(buffer[: span.stop - span.start], seed, j, k))
                tangents.append(tangent)
            self.release_buffers()
        # Forward AD is not implemented for the fused attention kernels (CPU flash, CUDA flash/efficient): use math.
        with fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
            for (_, _, param), tangent in zip(self.params(), tangents, strict=True):
                # Copying a dual view of itself into the parameter gives it the tangent for this level only.
                param.copy_(fwAD.make_dual(param.detach(), tangent))
            loss, directional = fwAD.unpack_dual(closure())
        if directional is None:
            raise RuntimeError("forward-grad: the closure's loss carries no tangent, so ∇L·v is unknown: "
                               "compute the "
                               "loss inside the closure from the parameters given to the optimizer (a loss computed "
                               "from detached copies has no forward derivative)")
        jvp = float(directional)
        with self.phase("update"):
            for (_, group, param), tangent in zip(self.params(), tangents, strict=True):
                dtype = self.working_dtype(param, group)
                if tangent.dtype == dtype:
                    param.add_(tangent, alpha=-group["lr"] * jvp)
                    continue
                # a half tangent is added block by block through a float32 buffer: half arithmetic would round
                # η·(∇L·v)·v before adding it
                spans = self.spans(param, group)
                buffer = self._buffer(param.device, dtype, spans[0].stop)
                flat, v = param.detach().view(-1), tangent.view(-1)
                for span in spans:
                    flat[span].add_(buffer[: span.stop - span.start].copy_(v[span]), alpha=-group["lr"] * jvp)
            self.release_buffers()
        self.state["global"]["projected_grad"] = jvp
        return loss
