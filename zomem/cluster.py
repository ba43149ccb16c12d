"""Sweeps bigger than one process: cells side by side on the GPUs of a box, deterministic shards of a sweep for
several machines, the shards' folders merged into one report, and the shards submitted as a Slurm array job through
submitit (whose local executor runs them on this machine).

A shard is a plain report folder holding its slice of the cells; merging reads folders, never live state, so shards
measured anywhere (by hand, by Slurm) assemble the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import operator
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from zomem import fit, records
from zomem.cell import Cell
from zomem.errors import UsageError
from zomem.records import Record
from zomem.sweep import Settings

if TYPE_CHECKING:
    import submitit

AUTO = "auto"
Jobs = int | Literal["auto"]
EXECUTORS = ("slurm", "local")
#: where an executor's shards write, inside the report folder: shards/1, shards/2, …
SHARDS_DIR = "shards"
#: submitit's own files (pickled jobs, each job's stdout and stderr), inside the report folder
JOBS_DIR = "jobs"
#: the lock the local executor's shards take turns on
MACHINE_LOCK = ".machine.lock"
T = TypeVar("T")


def parse_jobs(text: str) -> Jobs:
    """``auto`` or a whole number >= 1: how many cells are measured at a time."""
    if text == AUTO:
        return AUTO
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number >= 1, got {text!r}")
    return jobs


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N``: the K-th of N shards (1 <= K <= N)."""
    k, sep, n = text.partition("/")
    try:
        shard, shards = int(k), int(n)
    except ValueError:
        shard = shards = 0
    if not sep or not 1 <= shard <= shards:
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N (e.g. 1/4), got {text!r}")
    return shard, shards


def jobs_at_once(asked: Jobs, device: str, gpus: Sequence[str], allow_shared_cpu: bool) -> int:
    """How many cells run at a time: ``auto`` is one per visible GPU (1 on CPU, or on the one GPU ``cuda:N`` names).
    More than one on a CPU is refused unless ``allow_shared_cpu``: cells side by side share cores, caches and memory
    bandwidth."""
    if device == "cpu":
        jobs = 1 if asked == AUTO else asked
        if jobs > 1 and not allow_shared_cpu:
            raise UsageError(f"--jobs {jobs} on a CPU measures cells side by side, each slowed by the others (step "
                             "times, and peaks under memory pressure, are not those of a machine to itself): pass "
                             "--allow-shared-cpu to accept that (the index page says so), or use --jobs 1")
        return jobs
    if asked == AUTO:
        return max(len(gpus), 1) if device == "cuda" else 1
    if asked > 1 and device != "cuda":
        raise UsageError(f"--jobs spreads cells over the visible GPUs; {device} names one: use --device cuda")
    if asked > max(len(gpus), 1):
        raise UsageError(f"--jobs {asked}, but {len(gpus)} GPUs are visible and a cell has its GPUs to itself: use "
                         "--jobs auto")
    return asked


def shard(cells: Sequence[Cell], k: int, n: int) -> list[Cell]:
    """Shard ``k`` of ``n``: the cells whose place in plan order is k-1 modulo n, so each shard gets its share of every
    model (the plan goes model by model, so contiguous slices would leave the largest models to the last shard)."""
    mine = list(cells[k - 1::n])
    if not mine:
        raise UsageError(f"shard {k}/{n} of a sweep of {len(cells)} cells holds none: use at most {len(cells)} shards")
    return mine


@dataclass
class Merged:
    """Several report folders as one: their records and measured fits, and how many records each folder gave."""

    records: list[Record]
    fits: list[fit.Fit]
    sources: dict[Path, int]


def merge(folders: Sequence[Path]) -> Merged:
    """The records (and ``fits.jsonl`` lines) of ``folders``, in an order that gives shards 1…N their plan order back.

    In one folder a later record of a cell replaces an earlier one, as the folder's own report does. Across folders a
    cell's finished records must be identical (kept once), and an ``error`` gives way to a finished record (a retried
    cell); two different finished records of a cell are refused, naming the cell and both folders."""
    found: list[tuple[Path, list[Record]]] = []
    fits: list[tuple[Path, list[fit.Fit]]] = []
    for folder in folders:
        path = folder / "records.jsonl"
        if not path.exists():
            raise UsageError(f"{folder} holds no records.jsonl: name report folders (a shard whose job has not run yet "
                             "has none)")
        found.append((folder, _latest(records.read(path), lambda r: r.key)))
        fits.append((folder, _latest(fit.read_all(folder / "fits.jsonl"), _fit_key)))
    if not any(items for _, items in found):
        raise UsageError(f"{', '.join(map(str, folders))}: no records to merge")
    return Merged(records=_union(found, lambda r: r.key, _record_replaces, _records_differ, _describe_record),
                  fits=_union(fits, _fit_key, lambda new, old: False, operator.ne, _describe_fit),
                  sources={folder: len(items) for folder, items in found})


def _latest(items: list[T], key: Callable[[T], Hashable]) -> list[T]:
    latest: dict[Hashable, T] = {}
    for item in items:
        latest[key(item)] = item  # keeps the first one's place
    return list(latest.values())


def _union(sources: list[tuple[Path, list[T]]], key: Callable[[T], Hashable], replaces: Callable[[T, T], bool],
           differ: Callable[[T, T], bool], describe: Callable[[T], str]) -> list[T]:
    # Round robin: shard k holds plan places k-1, k-1+N, …, so taking one item from each folder in turn restores the
    # plan order, and with it the order of the tables' rows and columns.
    chosen: dict[Hashable, tuple[Path, T]] = {}
    for turn in itertools.zip_longest(*(items for _, items in sources)):
        for (folder, _), item in zip(sources, turn):
            if item is None:
                continue
            k = key(item)
            if k not in chosen or replaces(item, chosen[k][1]):
                chosen[k] = (folder, item)
            elif differ(item, chosen[k][1]):
                raise UsageError(f"{describe(item)} is in both {chosen[k][0]} and {folder}, measured differently: "
                                 "one cell, one answer; leave one of the two copies out of the merge")
    return [item for _, item in chosen.values()]


def _record_replaces(new: Record, old: Record) -> bool:
    return old.status == "error" and new.status != "error"


def _records_differ(new: Record, old: Record) -> bool:
    return new != old and "error" not in (new.status, old.status)


def _describe_record(record: Record) -> str:
    model, method, workload, tuning, dtype, device = record.key
    return f"cell {model} {method} {workload} ({tuning}, {dtype}, {device})"


def _fit_key(found: fit.Fit) -> Hashable:
    return found.hardware, found.method, found.workload, found.dtype


def _describe_fit(found: fit.Fit) -> str:
    return f"the largest fit of {found.method} on {found.hardware} ({found.workload})"


def write_merged(folder: Path, merged: Merged) -> None:
    """Write ``merged``'s records (and fits, if any) into ``folder``, replacing what was there."""
    folder.mkdir(parents=True, exist_ok=True)
    records.write(folder / "records.jsonl", merged.records)
    if merged.fits:
        path = folder / "fits.jsonl"
        path.unlink(missing_ok=True)
        for found in merged.fits:
            fit.append(path, found)


#: the settings every merged record must share, as a report shows one sweep's settings
SHARED_SETTINGS = ("device", "dtype", "precision", "tuning", "steps", "warmup", "warmup_batch", "ranks", "strategy")


def settings_of(merged: Sequence[Record], hparams: dict[str, Any]) -> Settings:
    """The settings the merged records were measured with, which they must share (refused otherwise), and
    ``hparams``, the hyper-parameters the sweep was given (each record lists all of its own)."""
    values = {name: list(dict.fromkeys(getattr(r, name) for r in merged)) for name in SHARED_SETTINGS}
    for name, found in values.items():
        if len(found) > 1:
            raise UsageError(f"the folders were measured with different {name} ({', '.join(map(str, found))}): a "
                             "report shows one sweep's settings, so merge the folders of one sweep")
    return Settings(**{name: found[0] for name, found in values.items()}, hparams=dict(hparams),
                    checkpointing=any(r.checkpointing for r in merged))


@contextlib.contextmanager
def one_at_a_time(lock: Path | None) -> Iterator[None]:
    """Wait for ``lock`` (a file; None: no waiting) and hold it, so that shards sharing one machine measure in turn."""
    if lock is None:
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def executor(kind: str, folder: Path, *, shards: int, partition: str | None, gpus_per_task: int,
             minutes: int) -> submitit.AutoExecutor:
    """A submitit executor for ``shards`` shard jobs, its files in ``folder``: Slurm's, each job one task with
    ``gpus_per_task`` GPUs for ``minutes`` on ``partition``; or the local one, which runs them on this machine."""
    import submitit

    try:
        chosen = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as exc:  # how submitit says that this machine has no srun
        raise UsageError(f"--executor {kind}: no Slurm on this machine (submitit: {exc}); run this on a login node "
                         "of the cluster, or use --executor local to run the shards here") from None
    if kind == "slurm":
        chosen.update_parameters(name="zomem-report", timeout_min=minutes, nodes=1, tasks_per_node=1,
                                 slurm_partition=partition, slurm_gpus_per_task=gpus_per_task or None)
    else:
        # The local shards take turns (one_at_a_time) and a waiting shard's clock runs: the limit covers the queue.
        chosen.update_parameters(name="zomem-report", timeout_min=minutes * shards, gpus_per_node=gpus_per_task)
    return chosen


def failures(jobs: Sequence[submitit.Job[Any]]) -> list[str]:
    """Wait for every job; one line for each that failed: its shard, its job id, the last line its command said on
    stderr and where its log is."""
    said = []
    for k, job in enumerate(jobs, start=1):
        if job.exception() is None:
            continue
        log = Path(job.paths.stderr)
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        last = next((line for line in reversed(lines) if line.startswith("zomem")), lines[-1] if lines else "")
        said.append(f"shard {k}/{len(jobs)} (job {job.job_id}) failed: {last or 'no output'} (log: {log})")
    return said
