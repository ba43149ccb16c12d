"""Optimizers whose update runs inside backward: LOMO (Lv et al., 2023) and AdaLomo (Lv et al., 2024).

Each parameter is updated as soon as its gradient is complete and the gradient is freed at once (torch's
``register_post_accumulate_grad_hook`` pattern), so the gradients never exist together: a step's gradient memory is
the largest gradient alive at once, not a copy of the parameters. ``step(closure)`` runs the closure, whose backward
applies the update. Half-precision parameters are updated in float32 blocks, so no full-size temporary is made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from zomem.optim.base import CPU_BLOCK, CUDA_BLOCK, check_positive, compute_dtype


def row_spans(rows: int, cols: int, device: torch.device) -> Iterator[slice]:
    """Blocks of whole rows of a (rows × cols) matrix, each about one walk block of elements."""
    per = max(1, (CPU_BLOCK if device.type == "cpu" else CUDA_BLOCK) // max(cols, 1))
    return (slice(start, min(start + per, rows)) for start in range(0, rows, per))


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as rows × columns (a vector is one row): the shape the factored second moments are kept for."""
    return tensor.view(tensor.shape[0], -1) if tensor.ndim >= 2 else tensor.view(1, -1)


class FusedBackward(Optimizer):
    """Base class: the update of a parameter runs in backward, as soon as its gradient is complete, and the gradient is
    freed there. Subclasses implement :meth:`update`; ``step(closure)`` runs the closure, whose backward updates."""

    forward_only: ClassVar[bool] = False
    #: gradients are applied and freed during backward, never all alive at once (read by the harness and estimator)
    fused_backward: ClassVar[bool] = True

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        #: bytes of the largest gradient this step's backward made (the record's gradient column)
        self.largest_gradient = 0
        self._index_groups()
        self._hooks = [param.register_post_accumulate_grad_hook(self._apply)
                       for group in self.param_groups for param in group["params"] if param.requires_grad]

    def _index_groups(self) -> None:
        self._groups = {id(param): group for group in self.param_groups for param in group["params"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: torch makes new group dicts, which the hooks must then read."""
        super().load_state_dict(state_dict)
        self._index_groups()

    def _apply(self, param: torch.Tensor) -> None:
        grad = param.grad
        self.largest_gradient = max(self.largest_gradient, grad.nbytes)
        with torch.no_grad():
            self.update(param, grad, self._groups[id(param)])
        param.grad = None

    def update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        """Apply one step to ``param`` with its complete gradient (called during backward)."""
        raise NotImplementedError

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """Run ``closure``, whose backward applies the update; without one, the update already ran in backward."""
        self.largest_gradient = 0
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class LOMO(FusedBackward):
    """LOMO: SGD fused into backward, θ ← θ(1 − ηλ) − η·g per parameter as its gradient completes;
    keeps nothing.

    The authors' code (lomo-optim) needs the model and its own backward call; this is the same update through torch's
    post-accumulate-grad hooks, driven by a closure like every other optimizer here. Their two-pass gradient-norm
    clipping and float16 loss scaling are left out: both need a second backward per step.
    """

    state_copies: ClassVar[float] = 0.0

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        lr, decay = group["lr"], group["weight_decay"]
        compute = compute_dtype(param.dtype)
        theta, g = as_matrix(param), as_matrix(grad)
        for span in row_spans(*theta.shape, param.device):
            # in the compute dtype: torch's own half-precision add rounds the learning rate to half (1e-8 is 0)
            work = theta[span].to(compute)
            if decay:
                work.mul_(1 - lr * decay)
            work.add_(g[span].to(compute), alpha=-lr)
            if work.data_ptr() != theta[span].data_ptr():
                theta[span].copy_(work)


class AdaLomo(FusedBackward):
    """AdaLomo: LOMO with Adafactor's factored second moments and grouped update normalisation, fused into backward.

    Per parameter at its step t, β = 1 − t^decay_rate, ε₁, ε₂ = eps, d = clip_threshold:
    a matrix keeps r ← βr + (1−β)·mean_cols(g² + ε₁) and c ← βc + (1−β)·mean_rows(g² + ε₁),
    u = g / √(r cᵀ / mean(r)); a vector keeps v ← βv + (1−β)(g² + ε₁), u = g / √v. Then
    u ← u / max(1, RMS(u)/d), η' = η·max(ε₂, RMS(θ)) and θ ← θ(1 − η'λ) − η'·u. The factors are
    kept in the compute dtype (float32 for half weights, as the authors keep
    them); u is formed block by block, never whole.
    """

    state_copies: ClassVar[float] = 0.0  # r and c per matrix, v per vector: see state_elements

    def __init__(self, params: Any, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0) -> None:
        check_positive("lr", lr, allow_zero=True)
        if len(eps) != 2 or min(eps) < 0:
            raise ValueError(f"invalid eps: {eps!r} (two numbers >= 0)")
        check_positive("clip_threshold", clip_threshold)
        if decay_rate >= 0:
            raise ValueError(f"invalid decay_rate: {decay_rate} (must be < 0)")
        check_positive("weight_decay", weight_decay, allow_zero=True)
        super().__init__(params, {"lr": lr, "eps": tuple(eps), "clip_threshold": clip_threshold,
                                  "decay_rate": decay_rate, "weight_decay": weight_decay})

    @staticmethod
    def state_elements(shapes: list[tuple[int, ...]], hparams: dict[str, Any]) -> int:
        """r and c (rows + columns) per matrix, v per vector (read by the estimator)."""
        return sum(shape[0] + math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape) for shape in shapes)

    def update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        compute = compute_dtype(param.dtype)
        theta, g = as_matrix(param), as_matrix(grad)
        rows, cols = theta.shape
        matrix = param.ndim >= 2
        if not state:
            state["step"] = 0
            if matrix:
                state["row"] = torch.zeros(rows, dtype=compute, device=param.device)
                state["col"] = torch.zeros(cols, dtype=compute, device=param.device)
            else:
                state["variance"] = torch.zeros(cols, dtype=compute, device=param.device)
        state["step"] += 1
        beta = 1.0 - state["step"] ** group["decay_rate"]
        eps1, eps2 = group["eps"]
        spans = list(row_spans(rows, cols, param.device))

        row_sq = torch.empty(rows, dtype=compute, device=param.device)
        col_sq = torch.zeros(cols, dtype=compute, device=param.device)
        for span in spans:
            squared = g[span].to(compute).square()
            row_sq[span] = squared.sum(dim=1)
            col_sq += squared.sum(dim=0)
        if matrix:
            state["row"].mul_(beta).add_(row_sq / cols + eps1, alpha=1 - beta)
            state["col"].mul_(beta).add_(col_sq / rows + eps1, alpha=1 - beta)
            row_scale = (state["row"] / state["row"].mean()).rsqrt_()
            col_scale = state["col"].rsqrt()
        else:
            state["variance"].mul_(beta).add_(col_sq + eps1, alpha=1 - beta)
            row_scale = torch.ones(1, dtype=compute, device=param.device)
            col_scale = state["variance"].rsqrt()

        def direction(span: slice) -> torch.Tensor:  # u's block: g / √(v̂), formed in the compute dtype
            return g[span].to(compute).mul(row_scale[span, None]).mul_(col_scale[None, :])

        numel = param.numel()
        u_rms = math.sqrt(sum(float(direction(span).square().sum()) for span in spans) / numel)
        theta_rms = math.sqrt(sum(float(theta[span].to(compute).square().sum()) for span in spans) / numel)
        lr = group["lr"] * max(eps2, theta_rms)
        clip = max(1.0, u_rms / group["clip_threshold"])
        for span in spans:
            work = theta[span].to(compute)
            if group["weight_decay"]:
                work.mul_(1 - lr * group["weight_decay"])
            work.add_(direction(span), alpha=-lr / clip)
            if work.data_ptr() != theta[span].data_ptr():
                theta[span].copy_(work)
