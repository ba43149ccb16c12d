"""First-order baselines with backprop, and the forward-only floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer


class Inference(Optimizer):
    """Not an optimizer: one forward pass per step and no update, the memory floor of any method."""

    forward_only: ClassVar[bool] = True
    state_copies: ClassVar[float] = 0.0

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return closure()


class SGD(torch.optim.SGD):
    """Plain SGD with backprop: gradients are its only extra memory (1P)."""

    forward_only: ClassVar[bool] = False
    state_copies: ClassVar[float] = 0.0  # 1 with momentum

    def __init__(self, params: Any, lr: float = 1e-5, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class Adam(torch.optim.AdamW):
    """AdamW with backprop, the usual fine-tuning baseline: gradients (1P) plus two moments (2P)."""

    forward_only: ClassVar[bool] = False
    state_copies: ClassVar[float] = 2.0

    def __init__(self, params: Any, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
