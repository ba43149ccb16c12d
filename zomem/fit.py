"""The largest ladder model that fits given hardware: predicted by the estimator, or measured by running cells.

Peak memory grows with model size along the ladder, so whether a model fits is monotone (fits, fits, …,
does not fit) and the answer is found by bisection, starting where the estimator points.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from zomem import estimate, models
from zomem.cell import Cell
from zomem.errors import CellFailed, UsageError
from zomem.hardware import GIB, HardwareRow
from zomem.records import Record, RecordsError

Source = Literal["predicted", "measured"]
#: the settings of the largest-fit table (SPEC §6): MeZO's memory workload, half-precision weights
DEFAULT_WORKLOAD = "multirc"
DEFAULT_DTYPE = "float16"
DEFAULT_LADDER = tuple(spec.name for spec in models.LADDER)

RunCell = Callable[[Cell], Record]


@dataclass
class Trial:
    """One ladder model tried: its peak (per GPU) and whether it fit."""

    model: str
    peak_bytes: int | None
    fits: bool
    #: predicted: the estimate's breakdown; measured: the record's status and probe
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fit:
    """The largest model that fits, and every model tried on the way."""

    hardware: str
    optimizer: str
    workload: str
    dtype: str
    precision: str
    source: Source
    #: bytes one device may use: the GPU's capacity, or the CPU budget
    limit_bytes: int
    answer: str | None
    trials: list[Trial]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


def search(n: int, fits: Callable[[int], bool], first: int | None = None) -> int:
    """The largest index in ``range(n)`` where the monotone ``fits`` holds (-1 if none), asking few indices.

    The first question is ``first`` (a guess, e.g. the estimator's answer), the second its neighbour on the
    side the answer lies (so a right guess costs two trials), then bisection of what is left.
    """
    low, high = -1, n  # fits(low) holds and fits(high) does not: sentinels outside the ladder
    ask = first if first is not None and 0 <= first < n else None
    while high - low > 1:
        probe = ask if ask is not None and low < ask < high else (low + high) // 2
        ok = fits(probe)
        low, high = (probe, high) if ok else (low, probe)
        ask = (probe + 1 if ok else probe - 1) if probe == first else None
    return low


def predict(row: HardwareRow, optimizer: str, workload: str = DEFAULT_WORKLOAD, dtype: str = DEFAULT_DTYPE, *,
            ladder: Sequence[str] = DEFAULT_LADDER, precision: str | None = None,
            calibration: estimate.Calibration | None = None) -> Fit:
    """The largest ladder model whose predicted per-GPU peak fits ``row``'s GPUs."""
    calibration = calibration or estimate.Calibration.load("cuda")
    capacity = row.gpu.memory_bytes
    trials: dict[int, Trial] = {}

    def fits(i: int) -> bool:
        e = estimate.estimate(ladder[i], optimizer, workload, dtype, gpus=row.count, device="cuda",
                              precision=precision, calibration=calibration, capacity_bytes=capacity)
        ok = e.peak_bytes <= capacity and not e.offloaded
        detail = {"per_gpu": dataclasses.asdict(e.worst), "placement": e.placement}
        if e.offloaded:
            detail["offloaded"] = len(e.offloaded)
        trials[i] = Trial(ladder[i], e.peak_bytes, ok, detail)
        return ok

    def roughly_fits(i: int) -> bool:
        # One device's estimate with the persistent parts split evenly: no placement, so it costs nothing.
        d = estimate.estimate(ladder[i], optimizer, workload, dtype, device="cuda", precision=precision,
                              calibration=calibration).worst
        return d.overhead + d.transient + (d.weights + d.optimizer_state + d.gradients) / row.count <= capacity

    found = search(len(ladder), fits, first=search(len(ladder), roughly_fits))
    prec = estimate.resolve_precision(optimizer, dtype, precision)
    return Fit(row.name, optimizer, workload, dtype, prec, "predicted", capacity,
               ladder[found] if found >= 0 else None, [trials[i] for i in sorted(trials)])


def measure(cell: Cell, limit_bytes: int, label: str, run: RunCell, *, ladder: Sequence[str] = DEFAULT_LADDER,
            guess: str | None = None) -> Fit:
    """The largest ladder model whose cell runs with its peak within ``limit_bytes``, by running cells.

    ``cell`` is the template (its model is replaced along the ladder); on a GPU it should carry
    ``memory_cap_bytes`` so the allocator stops where the emulated card would. ``guess`` seeds the search.
    """
    probe = estimate.PROBE[estimate.device_kind(measurable(cell).device)]
    trials: dict[int, Trial] = {}

    def fits(i: int) -> bool:
        record = run(dataclasses.replace(cell, model=ladder[i]))
        if record.status == "error":
            # A crash says nothing about memory; counting it as "does not fit" would shrink the answer silently.
            last_line = (record.error or "no message").strip().splitlines()[-1]
            raise CellFailed(f"{ladder[i]} with {cell.optimizer} failed, so whether it fits is unknown (its record "
                             f"holds the child's stderr): {last_line}")
        peak = record.peak_bytes.get(probe) if record.status == "ok" else None
        ok = peak is not None and peak <= limit_bytes
        detail: dict[str, Any] = {"status": record.status, "probe": probe}
        if record.error:
            detail["error"] = record.error_line
        trials[i] = Trial(ladder[i], peak, ok, detail)
        return ok

    first = list(ladder).index(guess) if guess in ladder else None
    found = search(len(ladder), fits, first)
    return Fit(label, cell.optimizer, cell.workload, cell.dtype, "pure", "measured", limit_bytes,
               ladder[found] if found >= 0 else None, [trials[i] for i in sorted(trials)])


def measurable(cell: Cell) -> Cell:
    """``cell``, if a cell can measure what a fit of it means: a half-precision first-order method is trained in
    mixed precision, which a cell (every tensor in one dtype) does not run."""
    if estimate.resolve_precision(cell.optimizer, cell.dtype) == "mixed":
        raise UsageError(f"a measured cell runs every tensor in {cell.dtype}; mixed-precision {cell.optimizer} can "
                         "only be predicted (use --predict, or --dtype float32)")
    return cell


def guess(limit_bytes: int, optimizer: str, workload: str, dtype: str, device: str,
          ladder: Sequence[str] = DEFAULT_LADDER) -> str | None:
    """The estimator's answer on one device of ``limit_bytes``: where a measured search starts."""
    calibration = estimate.Calibration.load(device)
    found = search(len(ladder), lambda i: estimate.estimate(
        ladder[i], optimizer, workload, dtype, device=device, precision="pure",
        calibration=calibration).peak_bytes <= limit_bytes)
    return ladder[found] if found >= 0 else None


def gpu_cell(row: HardwareRow, template: Cell, device_total_bytes: int) -> Cell:
    """The cell template for a measured fit on one GPU that emulates ``row``'s card with a memory cap."""
    if row.count != 1:
        raise UsageError(f"{row.name}: a measured fit emulates one card; several GPUs can only be predicted "
                         f"(use --predict, or 1x{row.gpu.name})")
    if row.gpu.memory_bytes > device_total_bytes:
        raise UsageError(f"this GPU has {device_total_bytes / GIB:.1f} GiB and cannot emulate a "
                         f"{row.gpu.memory_gib:.1f} GiB {row.gpu.name}: use --predict")
    return dataclasses.replace(template, memory_cap_bytes=row.gpu.memory_bytes)


def append(path: Path, result: Fit) -> None:
    """Append ``result`` as one JSON line (a report folder's ``fits.jsonl`` collects measured fits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result.as_dict()) + "\n")


def read(path: Path, workload: str, dtype: str) -> list[Fit]:
    """The fits in ``path`` (if it exists) made for ``workload`` and ``dtype``: the latest per hardware and
    optimizer."""
    if not path.exists():
        return []
    latest: dict[tuple[str, str], Fit] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            data["trials"] = [Trial(**t) for t in data["trials"]]
            result = Fit(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise RecordsError(f"{path}:{number}: corrupt fit: {exc}") from exc
        if (result.workload, result.dtype) == (workload, dtype):
            latest[(result.hardware, result.optimizer)] = result
    return list(latest.values())


def gpu_total_bytes(device: str, nvml: Any = None) -> int:
    """The memory of the GPU ``device`` names, read through NVML so that this (parent) process never initialises
    CUDA."""
    if nvml is None:
        import pynvml as nvml  # only a GPU box has the driver NVML needs
    index = torch.cuda._get_nvml_device_index(torch.device(device).index or 0)
    nvml.nvmlInit()
    try:
        return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index)).total)
    finally:
        nvml.nvmlShutdown()
