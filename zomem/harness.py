"""The parent side of a cell: run it in a fresh child process and turn any outcome into a record.

The parent never initialises CUDA; the child owns the device for exactly one cell.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import zomem
from zomem import records
from zomem.cell import Cell
from zomem.measure import STDERR_TAIL, record_for
from zomem.records import Record


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


def run_cell(cell: Cell, out: str | Path | None = None, timeout: float | None = None) -> Record:
    """Measure ``cell`` in a child process; append the record to ``out`` when given.

    Out of memory gives status ``oom``; a crash, a non-zero exit or a timeout gives ``error`` with the
    tail of the child's stderr. Bad input raises UsageError before any child starts.
    """
    cell = cell.validated()
    with tempfile.TemporaryDirectory(prefix="zomem-cell-") as tmp:
        cell_path, result_path = Path(tmp, "cell.json"), Path(tmp, "record.json")
        cell_path.write_text(cell.to_json())
        command = [sys.executable, "-m", "zomem.measure", str(cell_path), str(result_path)]
        try:
            child = subprocess.run(command, env=_child_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            record = record_for(cell, status="error", error=f"timed out after {timeout} s\n{stderr[-STDERR_TAIL:]}")
        else:
            if child.returncode == 0 and result_path.exists():
                record = Record.from_dict(json.loads(result_path.read_text()))
            else:
                record = failed(cell, child.returncode, child.stderr)
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
