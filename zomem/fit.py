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

from zomem import estimate, models, strategies
from zomem.cell import Cell, nvml_query
from zomem.errors import CellFailed, UsageError
from zomem.hardware import GIB, HardwareRow
from zomem.records import Record, RecordsError, method_label

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
    #: whether the optimizer's cells recompute activations in backward (gradient checkpointing)
    checkpointing: bool = False
    #: measured: the processes (devices) each trial ran as, and how they shared the model
    ranks: int = 1
    strategy: str | None = None

    @property
    def method(self) -> str:
        """The optimizer as the largest-fit table names it: ``adam + checkpointing`` for a checkpointed fit."""
        return method_label(self.optimizer, self.checkpointing)

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
            calibration: estimate.Calibration | None = None, checkpointing: bool = False,
            strategy: str | None = None) -> Fit:
    """The largest ladder model whose predicted per-GPU peak fits ``row``'s GPUs (with gradient checkpointing, if
    asked; spread over them as ``strategy`` says, by default as :func:`zomem.estimate.default_strategy` does)."""
    calibration = calibration or estimate.Calibration.load("cuda")
    capacity = row.gpu.memory_bytes
    trials: dict[int, Trial] = {}

    def fits(i: int) -> bool:
        e = estimate.estimate(ladder[i], optimizer, workload, dtype, gpus=row.count, device="cuda",
                              precision=precision, calibration=calibration, capacity_bytes=capacity,
                              checkpointing=checkpointing, strategy=strategy if row.count > 1 else None)
        ok = e.peak_bytes <= capacity and not e.offloaded
        detail = {"per_gpu": dataclasses.asdict(e.worst), "placement": e.placement}
        if e.offloaded:
            detail["offloaded"] = len(e.offloaded)
        trials[i] = Trial(ladder[i], e.peak_bytes, ok, detail)
        return ok

    def roughly_fits(i: int) -> bool:
        # One device's estimate with the persistent parts split evenly: no placement, so it costs nothing.
        d = estimate.estimate(ladder[i], optimizer, workload, dtype, device="cuda", precision=precision,
                              calibration=calibration, checkpointing=checkpointing).worst
        return d.overhead + d.transient + (d.weights + d.optimizer_state + d.gradients) / row.count <= capacity

    found = search(len(ladder), fits, first=search(len(ladder), roughly_fits))
    prec = estimate.resolve_precision(optimizer, dtype, precision)
    return Fit(row.name, optimizer, workload, dtype, prec, "predicted", capacity,
               ladder[found] if found >= 0 else None, [trials[i] for i in sorted(trials)], checkpointing)


def measure(cell: Cell, limit_bytes: int, label: str, run: RunCell, *, ladder: Sequence[str] = DEFAULT_LADDER,
            guess: str | None = None) -> Fit:
    """The largest ladder model whose cell runs with its peak within ``limit_bytes``, by running cells.

    ``cell`` is the template (its model is replaced along the ladder); on a GPU it should carry
    ``memory_cap_bytes`` so the allocator stops where the emulated card would. ``guess`` seeds the search. A cell of
    several ranks fits when its most loaded rank does (a record's peak is the most any rank reached).
    """
    probe = estimate.PROBE[estimate.device_kind(cell.device)]
    trials: dict[int, Trial] = {}

    def fits(i: int) -> bool:
        record = run(dataclasses.replace(cell, model=ladder[i]))
        if record.status == "error":
            # A crash says nothing about memory; counting it as "does not fit" would shrink the answer silently.
            last_line = (record.error or "no message").strip().splitlines()[-1]
            raise CellFailed(f"{ladder[i]} with {cell.optimizer} failed, so whether it fits is unknown (its record "
                             f"holds the child's stderr): {last_line}")
        peak, judged_by = judged_peak(record, probe)
        # A real card of this size gives CUDA its total less the driver's reserve, as the card measuring it does.
        reserve = record.cuda_memory.get("reserve", 0)
        ok = peak is not None and peak <= limit_bytes - reserve
        detail: dict[str, Any] = {"status": record.status, "probe": judged_by}
        if reserve:
            detail["reserve"] = reserve
        if record.error:
            detail["error"] = record.error_line
        trials[i] = Trial(ladder[i], peak, ok, detail)
        return ok

    first = list(ladder).index(guess) if guess in ladder else None
    found = search(len(ladder), fits, first)
    return Fit(label, cell.optimizer, cell.workload, cell.dtype, cell.precision, "measured", limit_bytes,
               ladder[found] if found >= 0 else None, [trials[i] for i in sorted(trials)], cell.checkpointing,
               cell.ranks, cell.strategy)


#: what a fit on a GPU without NVML judges by: the allocator's reserved peak plus the CUDA context measured at start
RESERVED_AND_CONTEXT = "torch_reserved+context"


def judged_peak(record: Record, probe: str) -> tuple[int | None, str]:
    """The peak that decides whether ``record``'s model fits, and where it comes from: ``probe``'s peak, or on a GPU
    whose nvml probe was dropped, :data:`RESERVED_AND_CONTEXT` (what nvml counts, bar memory CUDA allocates outside
    the caching allocator). None when the cell did not run."""
    if record.status != "ok":
        return None, probe
    if probe in record.peak_bytes:
        return record.peak_bytes[probe], probe
    if probe == "nvml" and "torch_reserved" in record.peak_bytes and "context" in record.cuda_memory:
        return record.peak_bytes["torch_reserved"] + record.cuda_memory["context"], RESERVED_AND_CONTEXT
    raise CellFailed(f"{record.model} with {record.optimizer} ran, but its record has no {probe} peak to judge a fit "
                     f"by (peaks: {', '.join(record.peak_bytes) or 'none'})")


def template(model: str, optimizer: str, workload: str, dtype: str, precision: str | None, device: str,
             **settings: Any) -> Cell:
    """The validated cell a measured fit of ``optimizer`` runs along the ladder, in the precision a prediction of it
    assumes (mixed for a first-order method in a half dtype, unless ``precision`` says otherwise); ``settings`` are
    the cell's others (steps, ``checkpointing`` …)."""
    prec = estimate.resolve_precision(optimizer, dtype, precision)
    return Cell(model, optimizer, workload, dtype=dtype, precision=prec, device=device, steps=1, **settings).validated()


def guess(limit_bytes: int, cell: Cell, ladder: Sequence[str] = DEFAULT_LADDER) -> str | None:
    """The estimator's answer for ``cell`` on devices of ``limit_bytes`` (one per rank): where a measured search
    starts."""
    calibration = estimate.Calibration.load(cell.device)
    found = search(len(ladder), lambda i: estimate.estimate(
        ladder[i], cell.optimizer, cell.workload, cell.dtype, device=cell.device, precision=cell.precision,
        calibration=calibration, hparams=cell.hparams, checkpointing=cell.checkpointing, gpus=cell.ranks,
        strategy=cell.strategy).peak_bytes <= limit_bytes)
    return ladder[found] if found >= 0 else None


def gpu_cell(row: HardwareRow, template: Cell, device_total_bytes: int | None, gpus: int = 1) -> Cell:
    """The cell template for a measured fit that emulates ``row``'s cards with a memory cap on each GPU, one rank per
    card (of ``gpus`` on this box; where NVML cannot read a GPU's size, ``device_total_bytes`` is None and the
    measuring child checks it). Several cards run as FSDP ranks unless the template names another strategy."""
    if row.count > gpus:
        raise UsageError(f"{row.name} needs {row.count} GPUs and this box has {gpus}: measure it where there are "
                         f"that many, or use --predict")
    if device_total_bytes is not None and row.gpu.memory_bytes > device_total_bytes:
        raise UsageError(f"this GPU has {device_total_bytes / GIB:.1f} GiB and cannot emulate a "
                         f"{row.gpu.memory_gib:.1f} GiB {row.gpu.name}: use --predict")
    strategy = strategies.resolve(template.strategy if row.count > 1 else None, row.count)
    strategies.check(strategy, row.count, template.optimizer, template.device, template.tuning)
    return dataclasses.replace(template, memory_cap_bytes=row.gpu.memory_bytes, ranks=row.count, strategy=strategy)


def append(path: Path, result: Fit) -> None:
    """Append ``result`` as one JSON line (a report folder's ``fits.jsonl`` collects measured fits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result.as_dict()) + "\n")


def read_all(path: Path) -> list[Fit]:
    """Every fit in ``path`` (none if it does not exist), in file order; a corrupt line names its number."""
    if not path.exists():
        return []
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            data["trials"] = [Trial(**t) for t in data["trials"]]
            found.append(Fit(**data))
        except (ValueError, TypeError, KeyError) as exc:
            raise RecordsError(f"{path}:{number}: corrupt fit: {exc}") from exc
    return found


def read(path: Path, workload: str, dtype: str) -> list[Fit]:
    """The fits in ``path`` (if it exists) made for ``workload`` and ``dtype``: the latest per hardware and
    optimizer (checkpointed or not)."""
    latest = {(f.hardware, f.method): f for f in read_all(path) if (f.workload, f.dtype) == (workload, dtype)}
    return list(latest.values())


def gpu_total_bytes(device: str, nvml: Any = None) -> int | None:
    """The memory of the GPU ``device`` names, read through NVML so that this (parent) process never initialises
    CUDA; None where NVML cannot read it (a MIG slice, a container without NVML)."""
    return nvml_query(device, lambda nvml, handle: int(nvml.nvmlDeviceGetMemoryInfo(handle).total), nvml)
