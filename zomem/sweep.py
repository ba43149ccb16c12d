"""A sweep: the cells a report needs, each run in its own child process, resumable after an interruption.

Records are appended as each cell finishes, so Ctrl-C loses only the cell in flight; a resumed sweep
reuses every record that matches a planned cell and runs the rest.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zomem import records
from zomem.cell import Cell
from zomem.errors import UsageError
from zomem.harness import run_cell
from zomem.records import Record

#: statuses a resumed sweep keeps: an out-of-memory is an answer, an error is worth another try
DONE = ("ok", "oom")


@dataclass(frozen=True)
class Settings:
    """How every cell of a sweep runs."""

    device: str
    dtype: str = "float32"
    tuning: str = "full"
    steps: int = 3
    warmup: int = 1
    #: examples per warm-up step (None: the workload's batch)
    warmup_batch: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None


def defaults(device: str) -> dict[str, Any]:
    """Step counts per device kind. On CPU a step of opt-125m takes seconds, so the default sweep (12 optimizers
    × 3 workloads) measures one step after a one-example warm-up to stay within 15 minutes; on a GPU, three
    steps after a full warm-up give medians with an IQR."""
    if device.split(":")[0] == "cpu":
        return {"steps": 1, "warmup": 1, "warmup_batch": 1}
    return {"steps": 3, "warmup": 1, "warmup_batch": None}


def plan(model_names: Sequence[str], optimizers: Sequence[str], workload_names: Sequence[str],
         settings: Settings) -> list[Cell]:
    """Every cell of the sweep, validated before any runs (bad names fail here, with nothing measured)."""
    return [Cell(model=m, optimizer=o, workload=w, tuning=settings.tuning, dtype=settings.dtype,
                 device=settings.device, steps=settings.steps, warmup=settings.warmup,
                 warmup_batch=settings.warmup_batch, hparams=dict(settings.hparams)).validated()
            for m, w, o in itertools.product(model_names, workload_names, optimizers)]


def matches(record: Record, cell: Cell) -> bool:
    """Whether ``record`` measured ``cell``: same cell, same step counts, and the cell's hyper-parameters."""
    same = (record.model, record.optimizer, record.workload, record.tuning, record.dtype) == (
        cell.model, cell.optimizer, cell.workload, cell.tuning, cell.dtype)
    same_device = record.device.split(":")[0] == cell.device.split(":")[0]
    same_steps = (record.steps, record.warmup, record.warmup_batch) == (cell.steps, cell.warmup, cell.warmup_batch)
    return same and same_device and same_steps and all(record.hparams.get(k) == v for k, v in cell.hparams.items())


def existing(path: Path, resume: bool) -> list[Record]:
    """The records a sweep may reuse: those in ``path`` when resuming; a non-empty file without --resume is refused."""
    found = records.read(path) if path.exists() else []
    if found and not resume:
        raise UsageError(f"{path} already holds {len(found)} records: pass --resume to finish that sweep, "
                         "or choose another --out")
    return found


def run(cells: Sequence[Cell], out: Path, *, resume: bool = False, timeout: float | None = None) -> list[Record]:
    """The record of every cell, in plan order: reused from ``out`` when resuming, else measured and appended."""
    previous = existing(out, resume)
    found: dict[int, Record] = {}
    for i, cell in enumerate(cells):
        # the latest matching record wins: a retried error is followed by its new outcome
        for record in previous:
            if record.status in DONE and matches(record, cell):
                found[i] = record
    todo = [i for i in range(len(cells)) if i not in found]
    bar = tqdm(todo, desc="cells", unit="cell", initial=len(found), total=len(cells), dynamic_ncols=True)
    for i in bar:
        cell = cells[i]
        bar.set_postfix_str(f"{cell.model} {cell.optimizer} {cell.workload}", refresh=True)
        found[i] = run_cell(cell, out=out, timeout=timeout)
    bar.close()
    return [found[i] for i in range(len(cells))]
