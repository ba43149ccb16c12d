"""GPU types and hardware rows (``N×TYPE``): the capacities a largest-fit search plans against.

Capacities are the total memory the driver reports for the card (what ``nvidia-smi`` shows); the CUDA
context and allocator slack are not subtracted here, they are the estimator's per-device overhead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zomem.errors import UsageError
from zomem.registry import Registry

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    """One GPU type: a name and its memory in bytes."""

    name: str
    memory_bytes: int

    @property
    def memory_gib(self) -> float:
        """The capacity in GiB, for tables and figures."""
        return self.memory_bytes / GIB


@dataclass(frozen=True)
class HardwareRow:
    """``count`` GPUs of one type, e.g. 4×A100-80GB: one row of the largest-fit table."""

    count: int
    gpu: Gpu

    @property
    def name(self) -> str:
        """The row as it is written on the command line, e.g. ``4xA100-80GB``."""
        return f"{self.count}x{self.gpu.name}"


GPUS: Registry[Gpu] = Registry("hardware")
#: name -> MiB: the total nvidia-smi prints for the card, with ECC as the card ships (on by default on L4, A10G
#: and L40S, whose totals are therefore below the data sheet's GB)
for _name, _mib in {
    "A100-40GB": 40960, "A100-80GB": 81920, "V100-16GB": 16160, "V100-32GB": 32510,
    "H100-80GB": 81559, "H200-141GB": 143771, "RTX-3090-24GB": 24576, "RTX-4090-24GB": 24564,
    "B200-180GB": 183359,  # nvidia-smi, NVIDIA B200
    "H100-NVL-94GB": 95830,  # nvidia-smi, NVIDIA H100 NVL
    "H20-96GB": 97871,  # nvidia-smi, NVIDIA H20
    "L40S-48GB": 46068,  # nvidia-smi, NVIDIA L40S (ECC on)
    "RTX-A6000-48GB": 49140,  # nvidia-smi, NVIDIA RTX A6000 (ECC off, its default)
    "L4-24GB": 23034,  # nvidia-smi, NVIDIA L4 (ECC on)
    "A10G-24GB": 23028,  # nvidia-smi, NVIDIA A10G (ECC on)
    "RTX-5090-32GB": 32607,  # nvidia-smi, NVIDIA GeForce RTX 5090
}.items():
    GPUS.register(_name, Gpu(_name, _mib * MIB))

#: the rows of the largest-fit table when none are asked for (SPEC §6)
DEFAULT_ROWS = tuple(f"{n}x{gpu}" for gpu in ("A100-80GB", "V100-32GB") for n in (1, 2, 4, 8))

_SIZE = re.compile(r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """A size such as ``2GiB``, ``1500MB`` or ``123456`` (bytes) as a number of bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"cannot read the size {text!r}: write e.g. 2GiB, 512MiB, 1.5GB or a byte count")
    unit = (match["unit"] or "B").lower()
    return int(float(match["value"]) * _UNITS[unit])


def gpu(name: str) -> Gpu:
    """A catalog GPU by name, or a user-defined ``NAME:GiB`` (e.g. ``A6000:48``)."""
    if ":" in name:
        label, _, size = name.partition(":")
        try:
            gib = float(size)
        except ValueError:
            gib = -1.0
        if not label or gib <= 0:
            raise UsageError(f"cannot read the GPU {name!r}: a user GPU is NAME:GiB with a positive size, "
                             "e.g. A6000:48")
        return Gpu(name, int(gib * GIB))  # named with its size, so the row reads back the same
    return GPUS.get(name)


def parse_row(text: str) -> HardwareRow:
    """A hardware row ``NxTYPE`` (``x`` or ``×``; ``TYPE`` alone means one GPU), e.g. ``8xV100-32GB``."""
    count, sep, name = re.sub("×", "x", text.strip()).partition("x")
    if not sep or not count.isdigit():
        count, name = "1", text.strip()
    if int(count) < 1:
        raise UsageError(f"hardware row {text!r} needs at least one GPU, e.g. 1x{name}")
    return HardwareRow(int(count), gpu(name))
