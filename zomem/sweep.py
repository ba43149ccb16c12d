"""A sweep: the cells a report needs, each run in its own child process, resumable after an interruption.

Records are appended as each cell finishes, so Ctrl-C (or SIGTERM) loses only the cells in flight; a resumed sweep
reuses every record that matches a planned cell and runs the rest. A report folder has one writer at a time. Several
cells can run at once, each pinned to GPUs of its own. A cell whose memory timeline is tracked tracks it in the child that
measures it, and the timelines are kept as they arrive.
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
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from zomem import optim, records, timelines
from zomem.cell import Cell, cuda_available
from zomem.errors import UsageError
from zomem.harness import kill_cells, run_cell
from zomem.records import Record
from zomem.timelines import SNAPSHOT_FILE, TIMELINE_FILE, Timeline

#: statuses a resumed sweep keeps: an out-of-memory is an answer, an error is worth another try
DONE = ("ok", "oom")
#: the file in a report folder that holds its writer's lock and pid
LOCK_FILE = ".zomem.lock"
#: runs one cell in a child process, as :func:`zomem.harness.run_cell` does
Launch = Callable[..., Record]


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
    #: processes (devices) per cell, and how they share the model (see :class:`zomem.cell.Cell`)
    ranks: int = 1
    strategy: str | None = None


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
                 checkpointing=settings.checkpointing and not optim.forward_only(optim.get(o)),
                 ranks=settings.ranks, strategy=settings.strategy).validated()
            for m, w, o in itertools.product(model_names, workload_names, optimizers)]


def matches(record: Record, cell: Cell) -> bool:
    """Whether ``record`` measured ``cell``: same cell (checkpointed or not, as many ranks sharing the model the same
    way), same step counts, and the cell's hyper-parameters."""
    same = (record.model, record.optimizer, record.workload, record.tuning, record.dtype, record.precision,
            record.checkpointing, record.ranks, record.strategy) == (
        cell.model, cell.optimizer, cell.workload, cell.tuning, cell.dtype, cell.precision, cell.checkpointing,
        cell.ranks, cell.strategy)
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


def visible_gpus() -> list[str]:
    """The GPUs cells can be pinned to, named as a child's ``CUDA_VISIBLE_DEVICES`` names them: this process's own
    list where it has one (a Slurm allocation), else indices. Counted through NVML, so this process never initialises
    CUDA."""
    if not cuda_available():
        return []
    count = torch.cuda.device_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in given.split(",")] if given else [str(i) for i in range(count)]
    return names[:count]


class GpuPool:
    """GPUs free to hand out: a cell waits until as many are free as it has ranks, and no GPU serves two cells."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.free = list(names)
        self.closed = False
        self.changed = threading.Condition()

    def take(self, count: int) -> list[str] | None:
        """``count`` free GPUs, the first in order; None once the pool is closed (the sweep is stopping)."""
        with self.changed:
            self.changed.wait_for(lambda: self.closed or len(self.free) >= count)
            if self.closed:
                return None
            taken, self.free = self.free[:count], self.free[count:]
            return taken

    def give_back(self, taken: Sequence[str]) -> None:
        """Free ``taken`` again."""
        with self.changed:
            self.free = [name for name in self.names if name in self.free or name in taken]
            self.changed.notify_all()

    def close(self) -> None:
        """Wake every waiting cell with no GPUs: the sweep is stopping."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()


def run(cells: Sequence[Cell], out: Path, *, resume: bool = False, timeout: float | None = None, jobs: int = 1,
        gpus: Sequence[str] = (), launch: Launch | None = None) -> list[Record]:
    """The record of every cell, in plan order: reused from ``out`` when resuming, else measured and appended as each
    finishes. Up to ``jobs`` cells run at a time; given ``gpus`` (see :func:`visible_gpus`), each is pinned to as many
    of them as it has ranks. ``launch`` runs a cell (default: the harness's ``run_cell``)."""
    launch = launch or run_cell
    previous = existing(out, resume)
    found: dict[int, Record] = {}
    for i, cell in enumerate(cells):
        # the latest matching record wins: a retried error is followed by its new outcome
        for record in previous:
            if record.status in DONE and matches(record, cell):
                found[i] = record
    todo = [i for i in range(len(cells)) if i not in found]
    # Closed on an interruption too, so that what is said next starts a line of its own.
    with tqdm(total=len(cells), initial=len(found), desc="cells", unit="cell", dynamic_ncols=True) as bar:
        if jobs == 1:
            for i in todo:
                cell = cells[i]
                bar.set_postfix_str(f"{cell.model} {cell.optimizer} {cell.workload}", refresh=True)
                found[i] = launch(cell, out=out, timeout=timeout)
                bar.update()
        elif todo:
            found.update(run_at_once({i: cells[i] for i in todo}, out, timeout, jobs, gpus, launch, bar))
            # Cells side by side finish in any order: leave their records in plan order, as one at a time would (a
            # merge of shards restores the plan's order, and with it the tables', from each shard's file order).
            records.write(out, [*previous, *(found[i] for i in todo)])
    return [found[i] for i in range(len(cells))]


def run_at_once(cells: dict[int, Cell], out: Path, timeout: float | None, jobs: int, gpus: Sequence[str],
                launch: Launch, bar: tqdm) -> dict[int, Record]:
    """Run ``cells`` (by plan index) ``jobs`` at a time, each thread waiting on its own child; their records, each
    appended to ``out`` as it arrives. An interruption kills the children in flight and keeps no record of theirs."""
    too_wide = [cell for cell in cells.values() if gpus and cell.ranks > len(gpus)]
    if too_wide:
        raise UsageError(f"a cell of {too_wide[0].ranks} ranks needs as many GPUs; {len(gpus)} are visible")
    pool = GpuPool(gpus)
    stopping = threading.Event()

    def measure(cell: Cell) -> Record | None:
        pinned = pool.take(cell.ranks) if gpus else []
        if pinned is None:
            return None
        try:
            if stopping.is_set():
                return None
            env = {"CUDA_VISIBLE_DEVICES": ",".join(pinned)} if gpus else None
            record = launch(cell, out=None, timeout=timeout, env=env)
        finally:
            pool.give_back(pinned)
        if stopping.is_set():  # its child was killed on the way out: that is no answer
            return None
        if not gpus and record.env:
            # The child cannot know what ran beside it; this process can, and the index page says so.
            record.env["cells_at_once"] = jobs
        records.append(out, record)
        return record

    found: dict[int, Record] = {}
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="zomem-sweep") as executor:
        futures: dict[Future[Record | None], int] = {executor.submit(measure, cell): i for i, cell in cells.items()}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    record = future.result()
                    if record is not None:
                        found[futures[future]] = record
                        bar.set_postfix_str(f"{record.model} {record.optimizer} {record.workload} done", refresh=False)
                    bar.update()
        except BaseException:
            stopping.set()
            pool.close()
            for future in pending:
                future.cancel()
            # A thread may start its child just after a kill: kill again until every thread has returned.
            while not all(future.done() for future in futures):
                kill_cells()
                wait(pending, timeout=0.1)
            raise
    return found


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


class Tracking:
    """The memory timelines a sweep tracks: one more step of each of ``cells`` after its measured ones, in the child
    that measures the cell when the sweep runs it (through :meth:`launch`), in a child of its own otherwise
    (:meth:`finish`). The timelines, in plan order, are rewritten to ``out`` as each arrives, and reused from it when
    resuming."""

    def __init__(self, cells: Sequence[Cell], out: Path, *, resume: bool = False) -> None:
        self.cells, self.out = list(cells), out
        previous = timelines.read(out) if resume and out.exists() else []
        self.found: dict[int, Timeline] = {}
        for i, cell in enumerate(self.cells):
            match = next((t for t in previous if timeline_matches(t, cell)), None)
            if match is not None:
                self.found[i] = match
        #: the records of tracked cells that did not run ok (they have no timeline)
        self.failed: list[Record] = []
        self._tried: set[int] = set(self.found)
        self._lock = threading.Lock()

    def launch(self, launch: Launch | None = None) -> Launch:
        """``launch`` (default: the harness's ``run_cell``) that also tracks the step of a cell this sweep tracks, in
        the child that measures it: the cell is not measured twice."""

        def run(cell: Cell, **options: Any) -> Record:
            with self._lock:
                i = next((i for i, c in enumerate(self.cells) if c == cell and i not in self._tried), None)
                if i is not None:
                    self._tried.add(i)
            if i is None:
                return (launch or run_cell)(cell, **options)
            return self._track(i, launch or run_cell, **options)

        return run

    def finish(self, timeout: float | None = None) -> tuple[list[Timeline], list[Record]]:
        """Track the cells no sweep has tracked yet, each in a child of its own. Returns the timelines, in plan order,
        and the records of the cells that did not run ok."""
        todo = [i for i in range(len(self.cells)) if i not in self._tried]
        with tqdm(todo, desc="timelines", unit="cell", initial=len(self.cells) - len(todo), total=len(self.cells),
                  dynamic_ncols=True) as bar:
            for i in bar:
                bar.set_postfix_str(f"{self.cells[i].model} {self.cells[i].optimizer} {self.cells[i].workload}",
                                    refresh=True)
                self._tried.add(i)
                self._track(i, run_cell, timeout=timeout)
        return [self.found[i] for i in sorted(self.found)], self.failed

    def _track(self, i: int, launch: Launch, **options: Any) -> Record:
        cell = dataclasses.replace(self.cells[i], timeline=True)
        with tempfile.TemporaryDirectory(prefix="zomem-timeline-") as side:
            record = launch(cell, side_dir=Path(side), **options)
            if record.status != "ok":
                with self._lock:
                    self.failed.append(record)
                return record
            timeline = Timeline.load(Path(side, TIMELINE_FILE))
            if timeline.snapshot is not None:
                timeline.snapshot = snapshot_name(cell.optimizer)
                shutil.move(Path(side, SNAPSHOT_FILE), self.out.parent / timeline.snapshot)
        with self._lock:
            self.found[i] = timeline
            timelines.write(self.out, [self.found[k] for k in sorted(self.found)])
        return record
