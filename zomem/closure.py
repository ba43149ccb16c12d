"""The closure an optimizer drives: one forward (and, for first-order methods, backward) of the workload, in the
cell's precision, under the phase hook that times it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zomem import memtrack, models, optim, probes, workloads
from zomem.cell import Cell


class Phases:
    """The phase hook handed to the closure and the optimizer: off during warm-up, then timed; in a tracked step,
    followed by the memory tracker."""

    def __init__(self) -> None:
        self.timer: probes.PhaseTimer | memtrack.Tracker | None = None

    def __call__(self, name: str) -> contextlib.AbstractContextManager[Any]:
        return self.timer.phase(name) if self.timer else contextlib.nullcontext()


@dataclass(frozen=True)
class Precision:
    """How a cell's forwards run: in the weights' dtype, or under autocast to ``autocast`` (mixed precision), with
    a gradient scaler where float16 gradients of a first-order method could underflow."""

    autocast: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def forward(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The context a forward pass runs in. Autocast's cache of the weights' half-precision copies stays on, as
        in Hugging Face Trainer: it lives until the forward's context exits."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def precision_for(cell: Cell, optimizer: torch.optim.Optimizer, device: torch.device) -> Precision:
    """The cell's :class:`Precision`: pure runs as stored; mixed autocasts, and scales float16 gradients."""
    if cell.precision == "pure":
        return Precision()
    scaled = cell.dtype == "float16" and not optim.forward_only(type(optimizer))
    return Precision(models.dtype(cell.dtype), torch.amp.GradScaler(device.type) if scaled else None)


def make_closure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, workload: workloads.Workload,
                 batch: workloads.Batch, phase: Phases,
                 precision: Precision = Precision()) -> tuple[Callable[[], torch.Tensor], list[int]]:
    """The closure the optimizer drives, and a counter of its calls (forward passes)."""
    forward_only = optim.forward_only(type(optimizer))
    device = batch.input_ids.device
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        if forward_only:
            with torch.no_grad(), phase("forward"), precision.forward(device):
                return workloads.loss(model, workload, batch)
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            with phase("forward"), precision.forward(device):
                loss = workloads.loss(model, workload, batch)
            with phase("backward"):
                (precision.scaler.scale(loss) if precision.scaler else loss).backward()
        return loss.detach()

    return closure, calls


class _CastCounter(TorchDispatchMode):
    """Counts the bytes of the half-precision copies autocast caches: casts of float32 leaf weights that require
    grad (autocast's own rule for what it caches), each weight once."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.weights = {p.data_ptr() for p in model.parameters() if p.requires_grad and p.dtype == torch.float32}
        self.cached: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype == self.dtype and args[0].data_ptr() in self.weights:
            self.cached[args[0].data_ptr()] = out.nbytes
        return out


def autocast_cache_bytes(model: torch.nn.Module, workload: workloads.Workload, precision: Precision,
                         device: torch.device) -> int:
    """Bytes of autocast's weight cache at the end of one forward, counted on a one-example batch (the cache holds
    one copy per weight whatever the batch); 0 without autocast."""
    if precision.autocast is None:
        return 0
    small = dataclasses.replace(workload, batch_size=1)
    batch = workloads.make_batch(small, model.config.vocab_size, device)
    counter = _CastCounter(model, precision.autocast)
    with torch.no_grad(), precision.forward(device), counter:
        workloads.loss(model, small, batch)
    return sum(counter.cached.values())
