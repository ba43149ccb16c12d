"""A cell: one measurement (model, optimizer, workload, tuning, dtype, device), validated up front."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from zomem import models, optim, strategies, workloads
from zomem.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")
#: the first compute capability whose tensor cores run bfloat16 (Ampere); older cards only emulate it, if at all
BFLOAT16_CAPABILITY = (8, 0)
T = TypeVar("T")


def cuda_available() -> bool:
    """Whether a CUDA device is usable, asked through NVML so this process never initialises CUDA."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def check_device_name(device: str) -> None:
    """Refuse a name that is none of ``auto``, ``cpu``, ``cuda`` and ``cuda:N`` (whether it is here or not)."""
    base = device.split(":")[0]
    if base not in DEVICES or (base != "cuda" and ":" in device):
        raise UsageError(f"unknown device {device!r}. Valid: auto, cpu, cuda, cuda:N")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``; ``cuda`` without a GPU is refused."""
    check_device_name(device)
    base = device.split(":")[0]
    if base == "auto":
        return "cuda" if cuda_available() else "cpu"
    if base == "cuda" and not cuda_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA GPU is visible. Use --device cpu.")
    return device


def nvml_query(device: str, query: Callable[[Any, Any], T], nvml: Any = None) -> T | None:
    """``query(nvml, handle)`` on the GPU that ``device`` names, asked through NVML so that this process never
    initialises CUDA; None where NVML cannot answer (a container without it, a MIG slice)."""
    try:
        if nvml is None:
            import pynvml as nvml
        # NVML numbers every GPU on the machine; CUDA numbers only those in CUDA_VISIBLE_DEVICES.
        index = torch.cuda._get_nvml_device_index(torch.device(device).index or 0)
        nvml.nvmlInit()
    except Exception:  # ImportError, a MIG UUID NVML does not list, or one of pynvml's own NVMLError subclasses
        return None
    try:
        return query(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
    finally:
        nvml.nvmlShutdown()


def check_bfloat16(dtype: str, capability: tuple[int, int], gpu: str) -> None:
    """Refuse bfloat16 on a GPU of compute ``capability`` older than Ampere's 8.0."""
    if dtype == "bfloat16" and tuple(capability) < BFLOAT16_CAPABILITY:
        raise UsageError(f"bfloat16 needs a GPU of compute capability {'.'.join(map(str, BFLOAT16_CAPABILITY))} or "
                         f"newer; {gpu} is {'.'.join(map(str, capability))}: use --dtype float16 or float32")


def check_gpus(device: str, gpus: int) -> None:
    """Refuse a cell of more GPUs than this process sees (counted through NVML where it can)."""
    if device.startswith("cuda") and gpus > 1 and torch.cuda.device_count() < gpus:
        raise UsageError(f"a cell of {gpus} ranks needs {gpus} GPUs; {torch.cuda.device_count()} are visible")


def check_dtype_on(device: str, dtype: str, nvml: Any = None) -> None:
    """Refuse a dtype the CUDA ``device`` cannot run, asked through NVML (where NVML cannot answer, the measuring
    child refuses it before building anything)."""
    if device.startswith("cuda") and dtype == "bfloat16":
        found = nvml_query(device, lambda nvml, handle: (nvml.nvmlDeviceGetCudaComputeCapability(handle),
                                                          nvml.nvmlDeviceGetName(handle)), nvml)
        if found is not None:
            capability, name = found
            check_bfloat16(dtype, capability, f"{device} ({name})")


def check_checkpointing(optimizer: str, checkpointing: bool, tuning: str) -> None:
    """Refuse checkpointing without a backward, or with prefix tuning (transformers drops the cache a checkpointed
    layer is given, and the prefix lives there)."""
    if checkpointing and optim.forward_only(optim.get(optimizer)):
        raise UsageError(f"gradient checkpointing recomputes activations for backward; {optimizer} runs no backward")
    if checkpointing and tuning == "prefix":
        raise UsageError("gradient checkpointing drops the key/value cache prefix tuning keeps its prefix in "
                         "(transformers); use --tuning full or lora")


def check_scaler(optimizer: str, precision: str, dtype: str) -> None:
    """Refuse an update inside backward under a float16 gradient scaler, which can neither unscale nor skip an update
    already made. The harness cannot run it; the estimator still predicts it (autocast to float16 keeps what bfloat16
    does)."""
    if optim.fused_backward(optim.get(optimizer)) and precision == "mixed" and dtype == "float16":
        raise UsageError(f"{optimizer} updates inside backward, where a float16 gradient scaler can neither unscale "
                         "the gradients nor skip an overflowed step; use --dtype bfloat16, or pure float16")


PRECISIONS = ("pure", "mixed")
HALF_DTYPES = ("float16", "bfloat16")


def check_precision(precision: str, dtype: str) -> None:
    """Refuse an unknown precision, or mixed precision without a half dtype to autocast to."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}. Valid: {', '.join(PRECISIONS)}")
    if precision == "mixed" and dtype not in HALF_DTYPES:
        raise UsageError(f"mixed precision keeps float32 weights and autocasts to --dtype; {dtype} is not a half "
                         f"dtype (use {' or '.join(HALF_DTYPES)})")


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
    #: ``pure``: every tensor stored in ``dtype``; ``mixed``: float32 weights (and so state and gradients), the
    #: closure run under autocast in ``dtype``, as Hugging Face Trainer's --fp16/--bf16 train
    precision: str = "pure"
    #: after the measured steps, track one more step tensor by tensor and write its memory timeline beside the record
    timeline: bool = False
    #: recompute each decoder layer's activations in backward instead of keeping them (gradient checkpointing through
    #: transformers; first-order methods only)
    checkpointing: bool = False
    #: processes the cell runs as, one per device (on CPU, ranks share the machine's cores)
    ranks: int = 1
    #: how ranks share the model (:data:`zomem.strategies.STRATEGIES`); None: one process holding everything (``fsdp``
    #: when ``ranks`` > 1)
    strategy: str | None = None

    @property
    def param_dtype(self) -> str:
        """The dtype the weights are stored in: ``dtype``, or float32 in mixed precision."""
        return "float32" if self.precision == "mixed" else self.dtype

    def validated(self) -> Cell:
        """The same cell with its device resolved; bad input raises UsageError before anything is allocated."""
        model = models.spec(self.model)
        models.dtype(self.dtype)
        check_precision(self.precision, self.dtype)
        optim.check(self.optimizer, models.dtype(self.param_dtype), self.hparams, model.config())
        check_checkpointing(self.optimizer, self.checkpointing, self.tuning)
        check_scaler(self.optimizer, self.precision, self.dtype)
        workloads.get(self.workload).check_fits(model.positions)
        if self.tuning not in models.TUNINGS:
            raise UsageError(f"unknown tuning {self.tuning!r}. Valid: {', '.join(models.TUNINGS)}")
        if self.tuning != "full":
            # peft wraps the meta model as it would the real one: a family it cannot tune this way is refused here
            models.apply_tuning(models.build_meta(model), self.tuning)
        if self.steps < 1 or self.warmup < 0:
            raise UsageError(f"need steps >= 1 and warmup >= 0 (got steps={self.steps}, warmup={self.warmup})")
        if self.warmup_batch is not None and self.warmup_batch < 1:
            raise UsageError(f"a warm-up batch needs at least one example (got warmup_batch={self.warmup_batch})")
        device = resolve_device(self.device)
        strategy = strategies.resolve(self.strategy, self.ranks)
        strategies.check(strategy, self.ranks, self.optimizer, device, self.tuning)
        check_gpus(device, self.ranks if strategy else 1)
        if self.timeline and strategy is not None:
            raise UsageError("a memory timeline tracks one process's step; run it on one device, without --strategy")
        check_dtype_on(device, self.dtype)
        return dataclasses.replace(self, device=device, strategy=strategy)

    def to_json(self) -> str:
        """The JSON the child process reads."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Cell:
        """The cell a parent wrote with :meth:`to_json`."""
        return cls(**json.loads(text))
