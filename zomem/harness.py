"""The parent side of a cell: run it in a fresh child process and turn any outcome into a record.

The parent never initialises CUDA; the child owns the device for exactly one cell. Children are forked from a fork
server that imported torch, transformers and zomem once and built nothing: a cell starts in a tenth of a second
instead of the seconds those imports take, in a process that has held no model and no CUDA context.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import types
from collections.abc import Iterator
from multiprocessing import forkserver
from pathlib import Path

import zomem
from zomem import records
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


def _child_env() -> dict[str, str]:
    # The child must import this very zomem, even when it runs from a source tree.
    env = dict(os.environ)
    root = str(Path(zomem.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    # CUDA numbers GPUs fastest first by default, NVML by PCI bus: on a box with mixed GPUs the nvml probe would
    # watch another card than the one the cell runs on. PCI order (nvidia-smi's) makes the two agree.
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return env


#: what the fork server imports before it forks any child
PRELOAD = ["torch", "transformers", "zomem.measure"]


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


def _run_child(cell_path: Path, result_path: Path, stderr_path: Path, timeout: float | None) -> int | None:
    """Run one measuring child to its end (or kill it at ``timeout``, or when this process is interrupted); its
    exit code, negative for a signal, or None when it timed out."""
    server = _fork_server()
    process = server.Process(target=child, args=(str(cell_path), str(result_path), str(stderr_path), _child_env(),
                                                 forkserver._forkserver._forkserver_pid), name="zomem-cell")
    with _bare_main():
        process.start()
    try:
        process.join(timeout)
        return process.exitcode
    finally:
        if process.exitcode is None:  # timed out, or this process was interrupted while it waited
            process.kill()
            process.join()


#: warnings a measuring child said that this process has already passed on: once per run is enough
_passed_on: set[str] = set()


def pass_on_warnings(stderr: str) -> None:
    """Say on stderr each warning line of a child's ``stderr`` (a dropped probe, say) not said before."""
    for line in stderr.splitlines():
        if line.startswith(WARNING) and line not in _passed_on:
            _passed_on.add(line)
            print(line, file=sys.stderr)


def run_cell(cell: Cell, out: str | Path | None = None, timeout: float | None = None,
             side_dir: Path | None = None) -> Record:
    """Measure ``cell`` in a child process; append the record to ``out`` when given. The files a timeline cell's
    child writes beside its record (its timeline and, on CUDA, the allocator snapshot) are moved into ``side_dir``.

    Out of memory gives status ``oom``; a crash, a non-zero exit or a timeout gives ``error`` with the
    tail of the child's stderr. Bad input raises UsageError before any child starts.
    """
    cell = cell.validated()
    with tempfile.TemporaryDirectory(prefix="zomem-cell-") as tmp:
        cell_path, result_path, stderr_path = Path(tmp, "cell.json"), Path(tmp, "record.json"), Path(tmp, "stderr")
        cell_path.write_text(cell.to_json())
        code = _run_child(cell_path, result_path, stderr_path, timeout)
        stderr = stderr_path.read_text(errors="replace") if stderr_path.exists() else ""
        if code is None:
            record = record_for(cell, status="error", error=f"timed out after {timeout} s\n{stderr[-STDERR_TAIL:]}")
        else:
            pass_on_warnings(stderr)
            if code == 0 and result_path.exists():
                record = Record.from_dict(json.loads(result_path.read_text()))
                for name in (TIMELINE_FILE, SNAPSHOT_FILE):
                    if side_dir is not None and Path(tmp, name).exists():
                        shutil.move(Path(tmp, name), side_dir / name)
            else:
                record = failed(cell, code, stderr)
    if out is not None:
        records.append(out, record)
    return record


def failed(cell: Cell, returncode: int, stderr: str) -> Record:
    """The record of a child that died: SIGKILL is the kernel's OOM killer's signature, anything else an error."""
    tail = stderr[-STDERR_TAIL:]
    if returncode == -signal.SIGKILL:
        return record_for(cell, status="oom",
                          error=f"child killed by SIGKILL (most likely the kernel's out-of-memory killer)\n{tail}")
    how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    return record_for(cell, status="error", error=f"child failed with {how}\n{tail}")
