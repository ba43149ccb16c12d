"""Helpers for tests that stop a zomem process mid-cell: find its measuring child in flight, and see it gone."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil


def measuring_child(parent: subprocess.Popen[str], marker: Path, timeout_s: float = 120.0) -> psutil.Process:
    """The measuring child of ``parent`` (forked by its fork server), once it has touched ``marker`` (the Sleeps
    fault optimizer's sign that its step is under way)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if parent.poll() is not None:
            raise AssertionError(f"{parent.args} exited with status {parent.returncode} before its cell's step")
        if marker.exists():
            for process in psutil.Process(parent.pid).children(recursive=True):
                if process.ppid() != parent.pid and "forkserver" in " ".join(process.cmdline()):
                    return process
        time.sleep(0.1)
    raise AssertionError(f"no measuring child of {parent.args} reached its step within {timeout_s} s")


def gone(process: psutil.Process, timeout_s: float = 15.0) -> bool:
    """Whether ``process`` has exited within ``timeout_s`` (a zombie waiting for init to reap it has exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False
