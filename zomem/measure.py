"""The child side of a cell: build the model, warm up, measure under every probe, return a record.

Run by the harness as ``python -m zomem.measure CELL.json RESULT.json`` in a fresh process, so
peaks, CUDA contexts and allocator caches never leak between cells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import zomem
from zomem import models, optim, probes, workloads
from zomem.cell import Cell
from zomem.records import Record

STDERR_TAIL = 4000


def record_for(cell: Cell, **fields: Any) -> Record:
    """A record naming ``cell``, its shape and the time, with ``fields`` filled in."""
    workload = workloads.get(cell.workload)
    return Record(
        model=cell.model, optimizer=cell.optimizer, workload=cell.workload, tuning=cell.tuning,
        dtype=cell.dtype, device=cell.device, batch_size=workload.batch_size, seq_len=workload.seq_len,
        candidates=workload.candidates, steps=cell.steps, warmup=cell.warmup, warmup_batch=cell.warmup_batch,
        time=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **fields,
    )


#: how out-of-memory reads where it is not torch.OutOfMemoryError: the CPU allocator, and CUDA failing outside the
#: caching allocator (a kernel's lazy loading, cuBLAS workspaces)
OOM_MESSAGES = ("can't allocate memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory failure, on GPU or CPU."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(message in str(exc) for message in OOM_MESSAGES)


def git_commit() -> str | None:
    """The commit of the zomem checkout, when it runs from one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(zomem.__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    """The CPU model as the kernel names it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, so a record says what produced it."""
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "zomem": zomem.__version__, "git_commit": git_commit(),
        "cpu": cpu_name(), "cpu_count": torch.get_num_threads(), "gpu": None, "driver": None, "gpu_total_bytes": None,
        # the harness freezes glibc's mmap threshold so CPU peaks are reproducible; say whether it was
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_total_bytes=props.total_memory, cuda=torch.version.cuda)
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
    return env


def json_safe(value: Any) -> Any:
    """Hyper-parameters as JSON: tuples become lists, anything else unusual its repr."""
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


class Phases:
    """The phase hook handed to the closure and the optimizer: off during warm-up, then timed."""

    def __init__(self) -> None:
        self.timer: probes.PhaseTimer | None = None

    def __call__(self, name: str) -> contextlib.AbstractContextManager[Any]:
        return self.timer.phase(name) if self.timer else contextlib.nullcontext()


def make_closure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, workload: workloads.Workload,
                 batch: workloads.Batch, phase: Phases) -> tuple[Callable[[], torch.Tensor], list[int]]:
    """The closure the optimizer drives, and a counter of its calls (forward passes)."""
    forward_only = optim.forward_only(type(optimizer))
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        if forward_only:
            with torch.no_grad(), phase("forward"):
                return workloads.loss(model, workload, batch)
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            with phase("forward"):
                loss = workloads.loss(model, workload, batch)
            with phase("backward"):
                loss.backward()
        return loss.detach()

    return closure, calls


def with_other(phases: dict[str, float], steps: list[float]) -> dict[str, float]:
    """Phase medians plus ``other``: step time outside every named phase (e.g. torch's own Adam update)."""
    other = probes.summarize(steps)["median"] - sum(phases.values())
    return {**phases, "other": max(other, 0.0)}


@dataclass
class Prepared:
    """A cell built in this process and ready to step: model, batch, optimizer, closure and probes."""

    cell: Cell
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    closure: Callable[[], torch.Tensor]
    #: closure calls since the counter was last reset: forward passes
    calls: list[int]
    phases: Phases
    probes: list[probes.Probe]
    #: probe readings before the model was built
    baseline: dict[str, int]
    env: dict[str, Any]

    def step(self) -> torch.Tensor:
        """One optimizer step."""
        return self.optimizer.step(self.closure)

    def start_measuring(self) -> None:
        """After warm-up: count forwards and time phases from here on."""
        self.calls[0] = 0
        self.phases.timer = probes.PhaseTimer(self.device) if self.cell.phases else None

    def breakdown(self, peaks: dict[str, int]) -> tuple[str, dict[str, int]]:
        """The probe the breakdown is derived from, and weights / state / gradients / transient bytes."""
        probe = "torch_allocated" if self.device.type == "cuda" else "cpu_hwm"
        # On CPU the peak is the whole process's: the interpreter and libraries read before the build are not transient.
        floor = self.baseline[probe] if self.device.type == "cpu" else 0
        weights = models.param_bytes(self.model)
        state = optim.state_bytes(self.optimizer)
        gradients = sum(p.grad.nbytes for p in self.model.parameters() if p.grad is not None)
        return probe, {
            "weights": weights,
            "trainable": models.param_bytes(self.model, trainable_only=True),
            "optimizer_state": state,
            "gradients": gradients,
            "transient": peaks[probe] - floor - weights - state - gradients,
        }

    def record(self, peaks: dict[str, int], step_seconds: list[float], steps: int) -> Record:
        """The record of ``steps`` measured steps with these peaks and times."""
        breakdown_probe, breakdown = self.breakdown(peaks)
        state_dtype = optim.state_dtype(self.optimizer)
        hparams = {k: json_safe(v) for k, v in self.optimizer.defaults.items()}
        if isinstance(self.optimizer, optim.ZerothOrder):
            hparams["seed"] = self.optimizer.state["global"]["seed"]
        return record_for(
            self.cell,
            params=models.param_count(self.model),
            trainable_params=models.param_count(self.model, trainable_only=True),
            peak_bytes=peaks,
            baseline_bytes=self.baseline,
            breakdown=breakdown,
            breakdown_probe=breakdown_probe,
            probe_methods={p.name: p.method for p in self.probes if p.method},
            step_seconds=probes.summarize(step_seconds),
            phases=with_other(self.phases.timer.medians(), step_seconds) if self.phases.timer else {},
            forwards_per_step=self.calls[0] / steps,
            state_dtype=str(state_dtype).removeprefix("torch.") if state_dtype else None,
            hparams=hparams,
            env=self.env,
        )


def torch_device(name: str) -> torch.device:
    """``name`` as a torch device; a bare ``cuda`` is ``cuda:0``, the card CUDA numbers first (torch.cuda's
    setters refuse a device without an index, and every probe must watch the same card)."""
    device = torch.device(name)
    return torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device


def prepare(cell: Cell) -> Prepared:
    """Take the baseline readings, then build the model, batch, optimizer and closure of ``cell`` here."""
    device = torch_device(cell.device)
    workload = workloads.get(cell.workload)
    # Baselines come before the first CUDA call: nvml's device-minus-baseline figure must count this process's
    # CUDA context, as the per-process figure does.
    active = probes.probes_for(device)
    baseline = {p.name: p.reading() for p in active}
    for probe in active:
        if isinstance(probe, probes.Nvml):
            probe.baseline_bytes = baseline[probe.name]
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if cell.memory_cap_bytes:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cell.memory_cap_bytes / total), device)
    env = environment(device)

    torch.manual_seed(0)
    model = models.apply_tuning(models.build(cell.model, device, models.dtype(cell.dtype)), cell.tuning)
    batch = workloads.make_batch(workload, model.config.vocab_size, device)
    optimizer = optim.create(cell.optimizer, optim.decay_groups(model.named_parameters()), **cell.hparams)
    phases = Phases()
    if isinstance(optimizer, optim.ZerothOrder):
        optimizer.phase = phases
    closure, calls = make_closure(model, optimizer, workload, batch, phases)
    return Prepared(cell, device, model, optimizer, closure, calls, phases, active, baseline, env)


def warmup_closure(prepared: Prepared) -> Callable[[], torch.Tensor]:
    """The closure warm-up steps drive: the measured one, or the same loss on the first ``warmup_batch`` examples."""
    cell = prepared.cell
    workload = workloads.get(cell.workload)
    if cell.warmup_batch is None or cell.warmup_batch >= workload.batch_size:
        return prepared.closure
    small = dataclasses.replace(workload, batch_size=cell.warmup_batch)
    batch = workloads.make_batch(small, prepared.model.config.vocab_size, prepared.device)
    closure, _ = make_closure(prepared.model, prepared.optimizer, small, batch, prepared.phases)
    return closure


def measure(cell: Cell) -> Record:
    """Run ``cell`` in this process: baseline → build → batch → warm-up → reset peaks → measured steps."""
    prepared = prepare(cell)
    warm = warmup_closure(prepared)
    for _ in range(cell.warmup):
        prepared.optimizer.step(warm)
    prepared.start_measuring()
    timer = probes.StepTimer(prepared.device)
    with contextlib.ExitStack() as region:
        for probe in prepared.probes:
            region.enter_context(probe)
        for _ in range(cell.steps):
            with timer.step():
                prepared.step()
            if prepared.phases.timer:
                prepared.phases.timer.end_step()
    return prepared.record({p.name: p.peak_bytes for p in prepared.probes}, timer.seconds, cell.steps)


def main(argv: list[str]) -> int:
    """Child entry point: read the cell, measure it, write the record (an ``oom`` record on out of memory)."""
    cell_path, result_path = argv
    cell = Cell.from_json(Path(cell_path).read_text())
    try:
        record = measure(cell)
    except Exception as exc:  # noqa: BLE001 - every failure of a cell becomes its record
        if not is_oom(exc):
            raise
        record = record_for(cell, status="oom", error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    Path(result_path).write_text(record.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
