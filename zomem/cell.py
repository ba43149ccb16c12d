"""A cell: one measurement (model, optimizer, workload, tuning, dtype, device), validated up front."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from zomem import models, optim, workloads
from zomem.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """Whether a CUDA device is usable, asked through NVML so this process never initialises CUDA."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``; ``cuda`` without a GPU is refused."""
    base = device.split(":")[0]
    if base not in DEVICES or (base != "cuda" and ":" in device):
        raise UsageError(f"unknown device {device!r}. Valid: auto, cpu, cuda, cuda:N")
    if base == "auto":
        return "cuda" if cuda_available() else "cpu"
    if base == "cuda" and not cuda_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA GPU is visible. Use --device cpu.")
    return device


@dataclass(frozen=True)
class Cell:
    """Everything that decides one measurement; the child process rebuilds it from JSON."""

    model: str
    optimizer: str
    workload: str
    tuning: str = "full"
    dtype: str = "float32"
    device: str = "auto"
    steps: int = 3
    warmup: int = 1
    hparams: dict[str, Any] = field(default_factory=dict)
    #: time the phases of each step (forward, perturb, update, backward …)
    phases: bool = True
    #: cap this process's GPU memory at this many bytes (emulates a smaller card)
    memory_cap_bytes: int | None = None
    #: examples in each warm-up step's batch (None: the workload's own). Lazily created optimizer state
    #: exists after one step of any batch, so a one-example warm-up readies a cell for a fraction of a step.
    warmup_batch: int | None = None

    def validated(self) -> Cell:
        """The same cell with its device resolved; bad input raises UsageError before anything is allocated."""
        model = models.spec(self.model)
        # Building over one meta parameter checks the hyper-parameters and allocates nothing.
        optim.create(self.optimizer, [torch.nn.Parameter(torch.empty(1, device="meta"))], **self.hparams)
        workloads.get(self.workload).check_fits(model.positions)
        models.dtype(self.dtype)
        if self.tuning not in models.TUNINGS:
            raise UsageError(f"unknown tuning {self.tuning!r}. Valid: {', '.join(models.TUNINGS)}")
        if self.steps < 1 or self.warmup < 0:
            raise UsageError(f"need steps >= 1 and warmup >= 0 (got steps={self.steps}, warmup={self.warmup})")
        if self.warmup_batch is not None and self.warmup_batch < 1:
            raise UsageError(f"a warm-up batch needs at least one example (got warmup_batch={self.warmup_batch})")
        return dataclasses.replace(self, device=resolve_device(self.device))

    def to_json(self) -> str:
        """The JSON the child process reads."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Cell:
        """The cell a parent wrote with :meth:`to_json`."""
        return cls(**json.loads(text))
