"""Optimizers that fail on purpose, defined outside the package, to test how the harness records failures."""

import os
import signal
import sys
import time
from pathlib import Path

import torch

from zomem.optim import MeZO


class OutOfMemory(MeZO):
    def step(self, closure):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class Crashes(MeZO):
    def step(self, closure):
        print("about to fail: the tail of stderr must reach the record", file=sys.stderr)
        raise RuntimeError("boom")


class KilledByKernel(MeZO):
    def step(self, closure):
        os.kill(os.getpid(), signal.SIGKILL)


class Sleeps(MeZO):
    """A step that never ends in a test's time: it touches the file $ZOMEM_FAULT_MARK, so the test knows the cell is
    in flight, and sleeps."""

    def step(self, closure):
        Path(os.environ["ZOMEM_FAULT_MARK"]).touch()
        time.sleep(600)


class RankOutOfMemory(MeZO):
    """Runs out of memory on rank 1 only: its peers wait in the loss all-reduce for a rank that will not come."""

    def step(self, closure):
        if os.environ.get("RANK") == "1":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().step(closure)


class RankKilled(MeZO):
    """Rank 1 is killed (as the kernel's out-of-memory killer kills) at its first step."""

    def step(self, closure):
        if os.environ.get("RANK") == "1":
            print("rank 1 about to be killed", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(closure)
