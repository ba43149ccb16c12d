"""Stand-ins for a GPU on a CPU-only machine: NVML, and the torch.cuda calls a measuring child makes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from zomem import measure, models, probes, workloads

GiB = 1 << 30


def _spend(seconds: float) -> None:
    """Busy for ``seconds``, holding the GIL (a real NVML call, through ctypes, lets it go: this is the worse case)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class FakeNvml:
    """Stands in for pynvml: device used memory and the process list are whatever the test sets; with processes None
    the process query raises, as on old drivers and in some containers. Each query can be made to take a while."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, used: int = GiB, processes: dict[int, int | None] | None = None, total: int = 80 * GiB,
                 capability: tuple[int, int] = (9, 0), name: str = "NVIDIA H100 80GB HBM3",
                 memory_info_s: float = 0.0, processes_s: float = 0.0) -> None:
        self.used = used
        self.processes = processes
        self.total = total
        self.capability = capability
        self.name = name
        self.memory_info_s = memory_info_s
        self.processes_s = processes_s
        self.init_error: Exception | None = None
        self.memory_error: Exception | None = None
        self.queries = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        return ("gpu", index)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: tuple[str, int]) -> list[SimpleNamespace]:
        _spend(self.processes_s)
        if self.processes is None:
            raise self.NVMLError("Function Not Found")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes.items()]

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[str, int]) -> SimpleNamespace:
        _spend(self.memory_info_s)
        self.queries += 1
        if self.memory_error is not None:
            raise self.memory_error
        return SimpleNamespace(used=self.used, total=self.total, free=self.total - self.used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: tuple[str, int]) -> tuple[int, int]:
        return self.capability

    def nvmlDeviceGetName(self, handle: tuple[str, int]) -> str:
        return self.name


class FakeEvent:
    """Stands in for torch.cuda.Event on the wall clock."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.at_s = 0.0

    def record(self, stream: object = None) -> None:
        self.at_s = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at_s - self.at_s) * 1000


@dataclass
class FakeCuda:
    """What a fake card reports: CUDA's total and free bytes at the start, the context CUDA makes (NVML sees the card's
    used memory grow by it), the allocator's peaks, the compute capability; and what the measuring child asked."""

    total: int = 79 * GiB
    free: int = 78 * GiB
    context: int = GiB
    allocated_peak: int = 3 * GiB
    reserved_peak: int = 4 * GiB
    capability: tuple[int, int] = (9, 0)
    fractions: list[float] = field(default_factory=list)
    built: list[str] = field(default_factory=list)


def fake_cuda(monkeypatch: pytest.MonkeyPatch, card: FakeCuda, nvml: FakeNvml | None = None) -> FakeCuda:
    """Make ``cuda:0`` this fake card for a measuring child run in this process: its tensors live on the CPU, its
    torch.cuda calls answer from ``card``, and NVML is ``nvml`` (None: no NVML, as on a MIG slice)."""
    cuda = torch.cuda

    def set_device(device: torch.device) -> None:
        if nvml is not None:
            nvml.used += card.context

    for name, value in {
        "set_device": set_device, "synchronize": lambda device=None: None,
        "reset_peak_memory_stats": lambda device=None: None,
        "memory_allocated": lambda device=None: 0, "memory_reserved": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: card.allocated_peak,
        "max_memory_reserved": lambda device=None: card.reserved_peak,
        "mem_get_info": lambda device=None: (card.free, card.total),
        "get_device_capability": lambda device=None: card.capability,
        "get_device_name": lambda device=None: "Fake GPU",
        "get_device_properties": lambda device=None: SimpleNamespace(name="Fake GPU", total_memory=card.total),
        "set_per_process_memory_fraction": lambda fraction, device=None: card.fractions.append(fraction),
        "Event": FakeEvent, "current_stream": lambda device=None: None,
    }.items():
        monkeypatch.setattr(cuda, name, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if nvml is None:
        def missing() -> None:
            raise probes.NvmlUnavailable("NVML Shared Library Not Found")
        monkeypatch.setattr(probes, "_import_pynvml", missing)
    else:
        monkeypatch.setattr(probes, "_import_pynvml", lambda: nvml)
    build, make_batch = models.build, workloads.make_batch

    def build_on_cpu(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        card.built.append(name)
        return build(name, torch.device("cpu"), dtype)

    monkeypatch.setattr(measure.models, "build", build_on_cpu)
    monkeypatch.setattr(measure.workloads, "make_batch",
                        lambda workload, vocab, device: make_batch(workload, vocab, torch.device("cpu")))
    return card
