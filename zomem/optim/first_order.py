"""First-order baselines with backprop, and the forward-only floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from zomem.optim.base import CPU_BLOCK, CUDA_BLOCK


class Inference(Optimizer):
    """Not an optimizer: one forward pass per step and no update, the memory floor of any method."""

    forward_only: ClassVar[bool] = True
    state_copies: ClassVar[float] = 0.0
    shardable: ClassVar[bool] = True

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return closure()


class SGD(torch.optim.SGD):
    """Plain SGD with backprop: gradients are its only extra memory (1P; momentum keeps one more copy).

    Float32 parameters take torch's own step. Half-precision ones are updated in float32 blocks: torch's for-loop
    rounds the learning rate to the parameter's dtype (1e-8 is 0 in float16), and its fused CPU kernel (torch
    2.13) leaves the leading elements of a half tensor unchanged.
    """

    forward_only: ClassVar[bool] = False
    state_copies: ClassVar[float] = 0.0  # 1 with momentum
    shardable: ClassVar[bool] = True

    def __init__(self, params: Any, lr: float = 1e-5, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        half = {torch.float16, torch.bfloat16}
        if not any(p.dtype in half for g in self.param_groups for p in g["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        # d = g + λθ; with momentum μ, b = μb + d (b = d at the first step); θ −= η·b, in float32 blocks
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        theta, grad = param.view(-1), param.grad.view(-1)
        size = min(CPU_BLOCK if param.device.type == "cpu" else CUDA_BLOCK, theta.numel())
        work = torch.empty(size, dtype=torch.float32, device=param.device)
        first = momentum and "momentum_buffer" not in self.state[param]
        if momentum and first:
            self.state[param]["momentum_buffer"] = torch.empty_like(param)
        buffer = self.state[param]["momentum_buffer"].view(-1) if momentum else None
        for start in range(0, theta.numel(), size):
            span = slice(start, min(start + size, theta.numel()))
            d = work[: span.stop - span.start].copy_(grad[span])
            if decay:
                d.add_(theta[span], alpha=decay)
            if buffer is not None:
                if not first:
                    d.add_(buffer[span], alpha=momentum)
                buffer[span].copy_(d)
            theta[span].add_(d, alpha=-lr)


#: how torch's AdamW walks the parameters, each with its own transient memory in the update: ``fused`` (a kernel
#: per group of tensors, computing in float32 and allocating nothing; Hugging Face Trainer's default since torch
#: 2.8), ``foreach`` (torch's own CUDA default, whose ``_foreach_sqrt`` allocates a temporary as large as all the
#: parameters) and ``for-loop`` (one tensor at a time: temporaries of the largest tensor)
ADAM_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")
#: each implementation's temporaries in the update, in copies of (all the parameters, the largest tensor): foreach's
#: square roots of every second moment; for-loop's square root and its quotient, one tensor at a time
STEP_TEMPORARIES = {"fused": (0.0, 0.0), "foreach": (1.0, 0.0), "for-loop": (0.0, 2.0)}


class Adam(torch.optim.AdamW):
    """AdamW with backprop, the usual fine-tuning baseline: gradients (1P) plus two moments (2P)."""

    forward_only: ClassVar[bool] = False
    state_copies: ClassVar[float] = 2.0
    #: torch's AdamW updates FSDP2's sharded parameters (and keeps sharded moments)
    shardable: ClassVar[bool] = True

    def __init__(self, params: Any, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, implementation: str = "fused") -> None:
        if implementation not in ADAM_IMPLEMENTATIONS:
            raise ValueError(f"invalid implementation: {implementation!r} (one of {', '.join(ADAM_IMPLEMENTATIONS)})")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         foreach=implementation == "foreach", fused=implementation == "fused")
        if implementation != "fused" and any(p.dtype == torch.float16 for g in self.param_groups for p in g["params"]):
            # torch's foreach and for-loop updates compute in the parameters' dtype, where eps=1e-8 is 0: a
            # parameter whose gradient is zero (most rows of an embedding) becomes 0/0
            raise ValueError(f"invalid implementation: {implementation!r} computes in float16, where eps rounds to "
                             "0 and zero gradients give NaN; use implementation=fused (it computes in float32) or "
                             "mixed precision")
        self.defaults["implementation"] = implementation

    @staticmethod
    def step_temporaries(hparams: dict[str, Any], device: str = "cuda") -> tuple[float, float]:
        """What the update allocates beside the gradients on ``device``'s kind, in copies of all the parameters and of
        the largest tensor (read by the estimator)."""
        return STEP_TEMPORARIES[hparams.get("implementation", "fused")]
