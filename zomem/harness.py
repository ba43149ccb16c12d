"""The parent side of a cell: run it in a fresh child process and turn any outcome into a record.

The parent never initialises CUDA; the child owns the device for exactly one cell. Children are forked from a fork
server that imported torch, transformers, the registered architectures and zomem once and built nothing: a cell
starts in a tenth of a second instead of the seconds those imports take, in a process that has held no model and no
CUDA context. A cell run as several ranks (:mod:`zomem.ranks`) is that many children, which end together: when one
fails, the others are killed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path

import zomem
from zomem import models, ranks, records, strategies
from zomem.cell import Cell
from zomem.measure import STDERR_TAIL, child, record_for
from zomem.probes import WARNING
from zomem.records import Record
from zomem.timelines import SNAPSHOT_FILE, TIMELINE_FILE


#: glibc's mmap threshold (its default, 128 KiB), frozen: by default glibc raises it as blocks are freed and then
#: keeps freed blocks of up to 32 MiB in the heap, in amounts that vary from run to run (up to 6% of an opt-125m
#: cell's CPU peak, measured). Frozen, every tensor of 128 KiB or more goes back to the OS when freed, and the
#: CPU high-water mark is reproducible to the MiB. A value the user set is kept.
MALLOC_MMAP_THRESHOLD = "131072"


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # The child must import this very zomem, even when it runs from a source tree.
    env = {**os.environ, **(extra or {})}
    root = str(Path(zomem.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    # CUDA numbers GPUs fastest first by default, NVML by PCI bus: on a box with mixed GPUs the nvml probe would
    # watch another card than the one the cell runs on. PCI order (nvidia-smi's) makes the two agree.
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return env


#: what the fork server imports before it forks any child
PRELOAD = ["torch", "transformers", "zomem.measure", *models.modeling_modules()]
#: the name of every measuring child
CELL_PROCESS = "zomem-cell"
#: Held to start, reap or kill a child, one thread at a time (a sweep of several jobs runs cells from several threads):
#: starting one swaps this process's environment and main module for a moment, and starting or reaping one reads the
#: exit status of every ended child from its fork-server pipe, which two readers at once can lose (it then reads 255).
_children_lock = threading.Lock()
#: the measuring children running now, for :func:`kill_cells`
_running: set[multiprocessing.process.BaseProcess] = set()


def _fork_server() -> multiprocessing.context.ForkServerContext:
    """The fork server's context, the server running. It starts with this process's environment, so the settings
    that only take effect when a process starts (glibc's mmap threshold) are put there while it starts."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    os.environ.update(_child_env())
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return context


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
    """multiprocessing has a child re-run the parent's main script, to find functions pickled from it; a cell's
    function lives in zomem.measure, so its child is told of none (a CLI's main must not run twice)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@dataclass
class _Process:
    """One measuring child of a cell (one rank of it): the files it writes and, once ended, its exit code."""

    result: Path
    stderr: Path
    env: dict[str, str] | None
    process: multiprocessing.process.BaseProcess | None = None
    #: whether this process killed it (its peer failed, or time ran out)
    killed: bool = False
    #: its exit code, once reaped
    code: int | None = None
    #: when it was reaped, in the order the cell's children were (None: not yet)
    ended: int | None = None

    @property
    def failed(self) -> bool:
        """Ended badly: a non-zero exit, or a record of a failure (a rank writes its record only when it fails, or
        when it is rank 0)."""
        return self.code != 0 or self.reported

    @property
    def reported(self) -> bool:
        """Wrote a record of its own failure (out of memory, say); a record cut short by a kill is not one."""
        try:
            return json.loads(self.result.read_text()).get("status") != "ok"
        except (OSError, ValueError):
            return False

    def reap(self, order: int, *, kill: bool = False) -> None:
        """Wait for it to end (killing it first, if asked) and keep its exit code."""
        with _children_lock:
            if kill:
                self.process.kill()
                self.killed = True
            self.process.join()
            _running.discard(self.process)
            self.code, self.ended = self.process.exitcode, order

    def tail(self, chars: int | None = STDERR_TAIL) -> str:
        """The end of what it said on stderr (all of it, for ``chars=None``)."""
        text = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return text if chars is None else text[-chars:]


def _run_children(cell_path: Path, children: list[_Process], timeout: float | None) -> _Process | None:
    """Start every child (the ranks of a cell) and wait until all end, or one fails, or ``timeout`` passes, or this
    process is interrupted; then kill any left, so no rank outlives the cell. Returns the child whose failure ended
    the cell (None when all ended well): one that recorded its own failure, else one not killed here, since a rank's
    peers crash in their collectives once it is gone. Raises TimeoutError when time ran out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    running: dict[int, _Process] = {}
    reaped = 0
    try:
        server = _fork_server()
        for c in children:
            with _children_lock:
                c.process = server.Process(target=child, name=CELL_PROCESS, args=(
                    str(cell_path), str(c.result), str(c.stderr), _child_env(c.env),
                    forkserver._forkserver._forkserver_pid))
                with _bare_main():
                    c.process.start()
                _running.add(c.process)
            running[c.process.sentinel] = c
        while running:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            ended = multiprocessing.connection.wait(list(running), left)
            if not ended:
                raise TimeoutError(f"timed out after {timeout} s")
            for sentinel in ended:
                running.pop(sentinel).reap(reaped)
                reaped += 1
            if any(c.failed for c in children if c.ended is not None):
                break
    finally:
        for c in running.values():  # a failed rank's peers wait in a collective that will never complete
            c.reap(reaped, kill=True)
    failed = sorted((c for c in children if c.failed), key=lambda c: c.ended)
    return next((c for c in failed if c.reported), next((c for c in failed if not c.killed), None))


def kill_cells() -> None:
    """Kill every measuring child this process has running (the threads waiting on them then record their end)."""
    with _children_lock:
        for process in _running:
            process.kill()


#: warnings a measuring child said that this process has already passed on: once per run is enough
_passed_on: set[str] = set()


def pass_on_warnings(stderr: str) -> None:
    """Say on stderr each warning line of a child's ``stderr`` (a dropped probe, say) not said before."""
    for line in stderr.splitlines():
        if line.startswith(WARNING) and line not in _passed_on:
            _passed_on.add(line)
            print(line, file=sys.stderr)


def run_cell(cell: Cell, out: str | Path | None = None, timeout: float | None = None,
             side_dir: Path | None = None, env: dict[str, str] | None = None) -> Record:
    """Measure ``cell`` in a child process; append the record to ``out`` when given. The files a timeline cell's
    child writes beside its record (its timeline and, on CUDA, the allocator snapshot) are moved into ``side_dir``.
    ``env`` adds to the child's environment (``CUDA_VISIBLE_DEVICES``, to pin it to a GPU).

    Out of memory gives status ``oom``; a crash, a non-zero exit or a timeout gives ``error`` with the
    tail of the child's stderr. Bad input raises UsageError before any child starts.
    """
    cell = cell.validated()
    with tempfile.TemporaryDirectory(prefix="zomem-cell-") as tmp:
        cell_path = Path(tmp, "cell.json")
        cell_path.write_text(cell.to_json())
        if cell.strategy in strategies.SPAWNED:  # one child per rank, a process group of even one
            children = [_Process(Path(tmp, f"record.{r}.json"), Path(tmp, f"stderr.{r}"),
                                 {**(env or {}), **ranks.Rank.env(r, cell.ranks, f"file://{tmp}/rendezvous")})
                        for r in range(cell.ranks)]
        else:
            children = [_Process(Path(tmp, "record.json"), Path(tmp, "stderr"), env)]
        try:
            first = _run_children(cell_path, children, timeout)
        except TimeoutError as exc:
            record = record_for(cell, status="error", error=f"{exc}\n{_tails(children)}")
        else:
            for c in children:
                pass_on_warnings(c.tail(chars=None))
            if first is None and children[0].result.exists():
                record = Record.from_dict(json.loads(children[0].result.read_text()))
                for name in (TIMELINE_FILE, SNAPSHOT_FILE):
                    if side_dir is not None and Path(tmp, name).exists():
                        shutil.move(Path(tmp, name), side_dir / name)
            else:
                ended = first or children[0]
                if ended.reported:  # a rank's own record of its out-of-memory or error
                    record = Record.from_dict(json.loads(ended.result.read_text()))
                else:
                    record = failed(cell, ended.code, ended.tail())
                record.error = _with_peers(record.error or "", children, ended)
    if out is not None:
        records.append(out, record)
    return record


def _tails(children: list[_Process], but: _Process | None = None) -> str:
    """The tail of each child's stderr (of each rank's but ``but``'s, named, for a cell of several)."""
    if len(children) == 1:
        return "" if but is not None else children[0].tail()
    each = STDERR_TAIL // len(children)
    return "\n".join(f"--- rank {r} ---\n{c.tail(each)}" for r, c in enumerate(children) if c is not but)


def _with_peers(text: str, children: list[_Process], ended: _Process) -> str:
    """``text`` (the failure of the rank that ended the cell), which rank it was and the other ranks' stderr
    tails."""
    if len(children) == 1:
        return text
    return f"rank {children.index(ended)} of {len(children)}: {text}\n{_tails(children, but=ended)}"


def failed(cell: Cell, returncode: int, stderr: str) -> Record:
    """The record of a child that died: SIGKILL is the kernel's OOM killer's signature, anything else an error."""
    tail = stderr[-STDERR_TAIL:]
    if returncode == -signal.SIGKILL:
        return record_for(cell, status="oom",
                          error=f"child killed by SIGKILL (most likely the kernel's out-of-memory killer)\n{tail}")
    how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    return record_for(cell, status="error", error=f"child failed with {how}\n{tail}")
