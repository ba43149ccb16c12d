"""Probes: context managers that report the peak memory over a region, and step/phase timers."""

from __future__ import annotations

import abc
import contextlib
import os
import statistics
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Self

import psutil
import torch


class Probe(abc.ABC):
    """Context manager that reports the peak bytes over its region."""

    name: ClassVar[str]
    peak_bytes: int | None = None
    #: how the last region was read, for probes that have more than one way (None for the others)
    method: str | None = None

    @abc.abstractmethod
    def reading(self) -> int:
        """Bytes in use now, as this probe counts them."""

    @abc.abstractmethod
    def _start(self) -> None:
        """Begins a region."""

    @abc.abstractmethod
    def _finish(self, body_raised: bool) -> int:
        """Ends a region and returns its peak bytes."""

    def __enter__(self) -> Self:
        self.peak_bytes = None
        self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.peak_bytes = self._finish(body_raised=exc is not None)


class _Sampler:
    """Calls `sample` at start, every interval_s from a daemon thread, and once more at stop."""

    def __init__(self, sample: Callable[[], None], interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"sampling interval must be positive, got {interval_s} s")
        self._sample = sample
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    def start(self) -> None:
        self._error = None
        self._stopping.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="zomem-probe-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping.wait(self._interval_s):
                self._sample()
        except Exception as error:  # kept for stop(): a sampler that died quietly would under-report
            self._error = error

    def stop(self) -> Exception | None:
        """Stops the thread, takes the closing sample, and returns the first error any sample raised."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is None:
            try:
                self._sample()
            except Exception as error:
                self._error = error
        return self._error


def _finish_sampler(sampler: _Sampler, body_raised: bool) -> None:
    error = sampler.stop()
    # The body's own exception (an out-of-memory, say) matters more than a failed sample.
    if error is not None and not body_raised:
        raise error


class CpuHwm(Probe):
    """Peak resident memory of this process: VmHWM reset through clear_refs, else sampled RSS."""

    name = "cpu_hwm"

    def __init__(self, proc_dir: str = "/proc/self", interval_s: float = 0.005) -> None:
        self.proc_dir = proc_dir
        self.method: str | None = None  # "clear_refs" or "psutil", chosen on entering a region
        self._process = psutil.Process()
        self._peak = 0
        self._sampler = _Sampler(self._sample, interval_s)

    def reading(self) -> int:
        return self._process.memory_info().rss

    def _sample(self) -> None:
        self._peak = max(self._peak, self.reading())

    def _start(self) -> None:
        try:
            # O_WRONLY without O_CREAT: a proc_dir that lacks clear_refs must fail, not gain a file.
            fd = os.open(os.path.join(self.proc_dir, "clear_refs"), os.O_WRONLY)
            try:
                os.write(fd, b"5")  # "5" resets the high-water mark to the current RSS
            finally:
                os.close(fd)
        except OSError:
            self.method = "psutil"
            self._peak = 0
            self._sampler.start()
        else:
            self.method = "clear_refs"

    def _finish(self, body_raised: bool) -> int:
        if self.method == "psutil":
            _finish_sampler(self._sampler, body_raised)
            return self._peak
        with open(os.path.join(self.proc_dir, "status")) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
        raise RuntimeError(f"no VmHWM line in {self.proc_dir}/status")


def _cuda_device(device: torch.device | str, probe: str) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the {probe} probe reads CUDA allocator statistics; device {device} is not a CUDA device")
    return device


class _TorchCudaProbe(Probe):
    def __init__(self, device: torch.device | str) -> None:
        self.device = _cuda_device(device, self.name)

    @abc.abstractmethod
    def _peak(self) -> int:
        """The allocator's peak since the last reset."""

    def _start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def _finish(self, body_raised: bool) -> int:
        torch.cuda.synchronize(self.device)
        return self._peak()


class TorchAllocated(_TorchCudaProbe):
    """Peak bytes held by live tensors, from the CUDA caching allocator."""

    name = "torch_allocated"

    def reading(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def _peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class TorchReserved(_TorchCudaProbe):
    """Peak bytes reserved by the CUDA caching allocator, cached blocks included."""

    name = "torch_reserved"

    def reading(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def _peak(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)


class NvmlUnavailable(RuntimeError):
    """NVML could not be loaded or initialised."""


#: seconds between nvml samples. A sample is two NVML queries, each a call into the driver; at this period sampling
#: costs under 1% of a step (tests/test_probes.py measures it against a fake NVML whose queries take a generous
#: real-world time), where 2 ms cost about 10%. Between region boundaries sampling only matters where device memory
#: falls back: the caching allocator keeps what it reserved, so within a region the driver's figure grows and the
#: closing sample reads the end state.
NVML_INTERVAL_S = 0.1


class Nvml(Probe):
    """Peak GPU memory as the driver sees it, sampled from a background thread (NVML keeps no peak)."""

    name = "nvml"

    def __init__(
        self,
        device_index: int = 0,
        *,
        baseline_bytes: int | None = None,
        interval_s: float = NVML_INTERVAL_S,
        nvml: types.ModuleType | None = None,
        pid: int | None = None,
    ) -> None:
        self.device_index = device_index
        self.baseline_bytes = baseline_bytes
        self.pid = os.getpid() if pid is None else pid
        self.method: str | None = None  # "process", "device-minus-baseline" or "device", set on exit
        self.samples = 0
        self._nvml = nvml if nvml is not None else _import_pynvml()
        try:
            self._nvml.nvmlInit()
        except Exception as error:
            raise NvmlUnavailable(
                f"NVML failed to initialise ({error}); check that the NVIDIA driver is loaded (nvidia-smi should run)"
            ) from error
        # NVML counts its initialisations; the matching shutdown runs when this probe is collected.
        weakref.finalize(self, self._nvml.nvmlShutdown)
        try:
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as error:  # pynvml raises its own NVMLError subclasses
            raise NvmlUnavailable(f"NVML cannot open GPU {device_index} ({error})") from error
        self._sampler = _Sampler(self._sample, interval_s)
        self._max_process = 0
        self._max_device = 0
        self._process_missing = False

    def reading(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def total(self) -> int:
        """The card's memory as the driver reports it (what nvidia-smi shows)."""
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).total

    def _process_bytes(self) -> int | None:
        try:
            running = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError:
            return None  # an older driver without this query, or a container not allowed it: fall back
        for process in running:
            if process.pid == self.pid:
                return process.usedGpuMemory  # None where the driver withholds it (some MIG, vGPU set-ups)
        return None  # our pid is not listed, e.g. inside a container's pid namespace

    def _sample(self) -> None:
        # Both figures every time, so a region that loses the per-process figure part-way can fall back whole.
        device = self.reading()
        process = self._process_bytes()
        self._max_device = max(self._max_device, device)
        if process is None:
            self._process_missing = True
        else:
            self._max_process = max(self._max_process, process)
        self.samples += 1

    def _start(self) -> None:
        self.method = None
        self.samples = 0
        self._max_process = 0
        self._max_device = 0
        self._process_missing = False
        self._sampler.start()

    def _finish(self, body_raised: bool) -> int:
        _finish_sampler(self._sampler, body_raised)
        if not self._process_missing:
            self.method = "process"
            return self._max_process
        if self.baseline_bytes is None:
            self.method = "device"
            return self._max_device
        self.method = "device-minus-baseline"
        return self._max_device - self.baseline_bytes


def _import_pynvml() -> types.ModuleType:
    try:
        import pynvml
    except ImportError as error:
        raise NvmlUnavailable(
            "the nvml probe needs the pynvml module: pip install nvidia-ml-py "
            "(or leave the nvml probe out of this run)"
        ) from error
    return pynvml


def _timing_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"zomem times cpu and cuda devices only, not {device}")
    return device


def _mark(device: torch.device) -> Any:
    """A point in time: the wall clock on CPU, an event on the device's current stream on CUDA."""
    if device.type == "cpu":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def _seconds(device: torch.device, start: Any, end: Any) -> float:
    """Seconds between two marks; on CUDA it waits for the end event."""
    if device.type == "cpu":
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000  # elapsed_time is in milliseconds


class StepTimer:
    """Times steps: wall seconds per step, device synchronised at boundaries (CUDA events on GPU)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = _timing_device(device)
        self.seconds: list[float] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Times the body as one step; a step that raises is not recorded."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # work queued before the step is not billed to it
        start = _mark(self.device)
        yield
        self.seconds.append(_seconds(self.device, start, _mark(self.device)))


class PhaseTimer:
    """Accumulates per-phase seconds within steps. On CUDA each phase is bracketed by events on the current stream,
    read when the step ends, so timing phases adds no synchronisation inside a step."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = _timing_device(device)
        self._in_phase = False
        self._spans: list[tuple[str, Any, Any]] = []  # (phase, start mark, end mark) within the current step
        self._steps: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the body's seconds to phase `name`; inside another phase it times nothing."""
        if self._in_phase:
            yield  # the outer phase already owns this time; timing it again would count it twice
            return
        start = _mark(self.device)
        self._in_phase = True
        try:
            yield
        finally:
            self._in_phase = False
        self._spans.append((name, start, _mark(self.device)))

    def end_step(self) -> None:
        """Closes the current step: each phase's total in it becomes one sample."""
        totals: dict[str, float] = {}
        for name, start, end in self._spans:
            totals[name] = totals.get(name, 0.0) + _seconds(self.device, start, end)
        self._spans = []
        for name, seconds in totals.items():
            self._steps.setdefault(name, []).append(seconds)

    def medians(self) -> dict[str, float]:
        """Median over steps of each phase's per-step total seconds."""
        return {name: statistics.median(totals) for name, totals in self._steps.items()}


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Median, interquartile range (q75 - q25, linear interpolation) and count of samples."""
    if not samples:
        raise ValueError("summarize needs at least one sample, got none")
    if len(samples) == 1:
        q25 = q75 = float(samples[0])
    else:
        q25, _, q75 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median": float(statistics.median(samples)), "iqr": q75 - q25, "n": len(samples)}


#: the start of a line a measuring child writes to stderr for the user; the harness passes such lines on
WARNING = "zomem: warning: "
#: ``probe_methods``' word for a probe the device has but this process could not run (nvml without NVML)
UNAVAILABLE = "unavailable"


def warn(message: str) -> None:
    """Say ``message`` on one line of stderr, marked so that the parent of a measuring child passes it on."""
    print(WARNING + message, file=sys.stderr, flush=True)


def nvml_for(device: torch.device, nvml: types.ModuleType | None = None) -> Nvml:
    """The nvml probe of the CUDA device ``device``; :class:`NvmlUnavailable` where NVML cannot watch it."""
    try:
        # NVML numbers every GPU on the machine; CUDA numbers only those in CUDA_VISIBLE_DEVICES.
        index = torch.cuda._get_nvml_device_index(device)
    except (RuntimeError, OSError) as error:  # a MIG slice's UUID names no NVML device; no libnvidia-ml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise NvmlUnavailable(f"NVML cannot find {device} (CUDA_VISIBLE_DEVICES={visible}): {error}") from error
    return Nvml(index, nvml=nvml)


def probes_for(device: torch.device | str, *, nvml: types.ModuleType | None = None) -> list[Probe]:
    """The memory probes for a device: cpu_hwm on CPU; torch_allocated, torch_reserved and nvml on CUDA, less nvml
    (with a warning) where NVML cannot watch the device: a MIG slice, a container without the NVML library."""
    device = torch.device(device)
    if device.type == "cpu":
        return [CpuHwm()]
    if device.type == "cuda":
        active: list[Probe] = [TorchAllocated(device), TorchReserved(device)]
        try:
            active.append(nvml_for(device, nvml))
        except NvmlUnavailable as error:
            warn(f"the nvml probe is dropped, peaks come from the torch probes only: {error}")
        return active
    raise ValueError(f"zomem has memory probes for cpu and cuda devices, not {device}")


def probe_methods(device: torch.device, active: Sequence[Probe]) -> dict[str, str]:
    """Probe name -> how it read its last region, for probes with more than one way; on CUDA, ``nvml`` is
    :data:`UNAVAILABLE` when it was dropped."""
    methods = {p.name: p.method for p in active if p.method}
    if device.type == "cuda" and not any(isinstance(p, Nvml) for p in active):
        methods[Nvml.name] = UNAVAILABLE
    return methods
