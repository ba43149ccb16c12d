"""Adafactor (Shazeer and Stern, 2018) as torch implements it: factored second moments, no first moment."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch


class Adafactor(torch.optim.Adafactor):
    """Adafactor (torch.optim.Adafactor): a row and a column factor of the second moment per matrix, no first moment.

    torch's for-loop implementation: its update is one temporary the size of the tensor being updated, where the
    foreach one would make one for every tensor at once. It computes in the parameters' dtype.
    """

    forward_only: ClassVar[bool] = False
    state_copies: ClassVar[float] = 0.0  # row and column factors: see state_elements

    def __init__(self, params: Any, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay,
                         foreach=False)

    @staticmethod
    def state_elements(shapes: list[tuple[int, ...]], hparams: dict[str, Any]) -> int:
        """Per tensor: a row and a column factor over its last two dimensions (a vector: a full second moment), and a
        step counter (read by the estimator)."""
        def factors(shape: tuple[int, ...]) -> int:
            if len(shape) < 2:
                return math.prod(shape)
            return math.prod(shape[:-2]) * (shape[-2] + shape[-1])

        return sum(factors(shape) + 1 for shape in shapes)

    @staticmethod
    def step_temporaries(hparams: dict[str, Any], device: str = "cuda") -> tuple[float, float]:
        """The update's temporary: the variance estimate (then the update) of one tensor at a time, in copies of all the
        parameters and of the largest tensor (read by the estimator)."""
        return 0.0, 1.0
