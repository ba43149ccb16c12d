"""A sweep: the cells a report needs, each run in its own child process, resumable after an interruption.

Records are appended as each cell finishes, so Ctrl-C (or SIGTERM) loses only the cell in flight; a resumed sweep
reuses every record that matches a planned cell and runs the rest. A report folder has one writer at a time. Memory
timelines are tracked the same way, one cell at a time, and kept as they arrive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zomem import optim, records, timelines
from zomem.cell import Cell
from zomem.errors import UsageError
from zomem.harness import run_cell
from zomem.records import Record
from zomem.timelines import SNAPSHOT_FILE, TIMELINE_FILE, Timeline

#: statuses a resumed sweep keeps: an out-of-memory is an answer, an error is worth another try
DONE = ("ok", "oom")
#: the file in a report folder that holds its writer's lock and pid
LOCK_FILE = ".zomem.lock"


@dataclass(frozen=True)
class Settings:
    """How every cell of a sweep runs."""

    device: str
    dtype: str = "float32"
    precision: str = "pure"
    tuning: str = "full"
    steps: int = 3
    warmup: int = 1
    #: examples per warm-up step (None: the workload's batch)
    warmup_batch: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    #: gradient checkpointing (first-order methods)
    checkpointing: bool = False


def defaults(device: str) -> dict[str, Any]:
    """Step counts per device kind. On CPU a step of opt-125m takes seconds to a minute, so a sweep measures one
    step after a one-example warm-up; on a GPU, three steps after a full warm-up give medians with an IQR."""
    if device.split(":")[0] == "cpu":
        return {"steps": 1, "warmup": 1, "warmup_batch": 1}
    return {"steps": 3, "warmup": 1, "warmup_batch": None}


def plan(model_names: Sequence[str], optimizers: Sequence[str], workload_names: Sequence[str],
         settings: Settings) -> list[Cell]:
    """Every cell of the sweep, validated before any runs (bad names fail here, with nothing measured). Checkpointing
    applies to the sweep's first-order methods: the others run no backward."""
    return [Cell(model=m, optimizer=o, workload=w, tuning=settings.tuning, dtype=settings.dtype,
                 precision=settings.precision,
                 device=settings.device, steps=settings.steps, warmup=settings.warmup,
                 warmup_batch=settings.warmup_batch, hparams=dict(settings.hparams),
                 checkpointing=settings.checkpointing and not optim.forward_only(optim.get(o))).validated()
            for m, w, o in itertools.product(model_names, workload_names, optimizers)]


def matches(record: Record, cell: Cell) -> bool:
    """Whether ``record`` measured ``cell``: same cell (checkpointed or not), same step counts, and the cell's
    hyper-parameters."""
    same = (record.model, record.optimizer, record.workload, record.tuning, record.dtype, record.precision,
            record.checkpointing) == (cell.model, cell.optimizer, cell.workload, cell.tuning, cell.dtype,
                                      cell.precision, cell.checkpointing)
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


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this process alone, creating it; a second writer is refused with the holder's pid. The lock
    is the kernel's (flock): a holder that died no longer holds it, so the next sweep takes the folder over."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot write into {folder}: {exc.strerror or exc}; choose another --out") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"{folder} is being written by another zomem sweep (pid {holder}): wait for it to "
                             "finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # and with it the lock


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
    # Closed on an interruption too, so that what is said next starts a line of its own.
    with tqdm(todo, desc="cells", unit="cell", initial=len(found), total=len(cells), dynamic_ncols=True) as bar:
        for i in bar:
            cell = cells[i]
            bar.set_postfix_str(f"{cell.model} {cell.optimizer} {cell.workload}", refresh=True)
            found[i] = run_cell(cell, out=out, timeout=timeout)
    return [found[i] for i in range(len(cells))]


def timeline_matches(timeline: Timeline, cell: Cell) -> bool:
    """Whether ``timeline`` tracked a step of ``cell``: same cell and the cell's hyper-parameters."""
    same = (timeline.model, timeline.optimizer, timeline.workload, timeline.tuning, timeline.dtype,
            timeline.precision) == (cell.model, cell.optimizer, cell.workload, cell.tuning, cell.dtype, cell.precision)
    same_device = timeline.device.split(":")[0] == cell.device.split(":")[0]
    return same and same_device and all(timeline.hparams.get(k) == v for k, v in cell.hparams.items())


def snapshot_name(optimizer: str) -> str:
    """The file an optimizer's CUDA allocator snapshot is kept in, beside the timelines (a ``module:Class`` name's
    punctuation made safe)."""
    return "memory_snapshot_" + re.sub(r"[^A-Za-z0-9._-]", "_", optimizer) + ".pickle"


def run_timelines(cells: Sequence[Cell], out: Path, *, resume: bool = False,
                  timeout: float | None = None) -> tuple[list[Timeline], list[Record]]:
    """Track one step of every cell, each in its own child after its measured steps; the timelines, in plan order,
    are rewritten to ``out`` as each arrives (reused from it when resuming), each CUDA snapshot kept beside it.
    Returns the timelines and the records of the cells that did not run ok (they have none)."""
    previous = timelines.read(out) if resume and out.exists() else []
    found: dict[int, Timeline] = {}
    for i, cell in enumerate(cells):
        match = next((t for t in previous if timeline_matches(t, cell)), None)
        if match is not None:
            found[i] = match
    failed: list[Record] = []
    todo = [i for i in range(len(cells)) if i not in found]
    with tqdm(todo, desc="timelines", unit="cell", initial=len(found), total=len(cells), dynamic_ncols=True) as bar:
        for i in bar:
            cell = dataclasses.replace(cells[i], timeline=True)
            bar.set_postfix_str(f"{cell.model} {cell.optimizer} {cell.workload}", refresh=True)
            with tempfile.TemporaryDirectory(prefix="zomem-timeline-") as side:
                record = run_cell(cell, timeout=timeout, side_dir=Path(side))
                if record.status != "ok":
                    failed.append(record)
                    continue
                timeline = Timeline.load(Path(side, TIMELINE_FILE))
                if timeline.snapshot is not None:
                    timeline.snapshot = snapshot_name(cell.optimizer)
                    shutil.move(Path(side, SNAPSHOT_FILE), out.parent / timeline.snapshot)
            found[i] = timeline
            timelines.write(out, [found[k] for k in sorted(found)])
    return [found[i] for i in sorted(found)], failed
