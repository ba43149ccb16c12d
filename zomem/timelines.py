"""Memory timelines: live tensor bytes by category over one tracked step of a cell, as its child recorded them.

A timeline is to the tracked step what a record is to the measured ones: plain data, written by the measuring child
(:mod:`zomem.memtrack`) beside its record, read by the report. Its series has one row per allocation or free, in
columns: the dispatched operation it happened at (``op``), seconds since the step began, the module running then
(an index into ``modules``) and the live bytes of every category after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from zomem.records import RecordsError, check_fields

SCHEMA = 1
#: what a tracked storage is, bottom of the stack first: what a step keeps, then what it makes and frees
CATEGORIES = ("weights", "optimizer_state", "gradients", "autocast_cache", "perturbation", "activations", "logits",
              "temporaries")
LABELS = {"weights": "weights", "optimizer_state": "optimizer state", "gradients": "gradients",
          "autocast_cache": "autocast cache", "perturbation": "perturbation buffers",
          "activations": "activations saved for backward", "logits": "logits and loss", "temporaries": "temporaries"}
#: the side files a timeline cell's child writes beside its record
TIMELINE_FILE = "timeline.json"
SNAPSHOT_FILE = "memory_snapshot.pickle"
#: the pseudo-module of what runs outside the model in a forward or a backward: the loss and its gradient
LOSS = "loss"
#: a phase band's name for the ops outside every named phase (the phase timer calls their time ``other``)
OTHER = "other"


class Band(NamedTuple):
    """A phase of the step: its name, its operations (``start`` + 1 … ``end``, counted from 1) and its seconds."""

    name: str
    start: int
    end: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Peak:
    """The most tracked bytes at once: where in the step, and what they were."""

    #: the row of the series, and the operation it happened at
    row: int
    op: int
    bytes: int
    phase: str
    module: str
    #: category -> bytes, every category (zero where absent)
    categories: dict[str, int]

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        """The ``n`` largest categories present, largest first."""
        present = sorted(((k, v) for k, v in self.categories.items() if v > 0), key=lambda kv: -kv[1])
        return present[:n]


@dataclass
class Timeline:
    """One tracked step of one cell: its phases as bands of operations, and the series of live bytes by category."""

    model: str
    optimizer: str
    workload: str
    tuning: str
    dtype: str
    precision: str
    device: str
    #: operations dispatched during the step, and its seconds (tracking included)
    ops: int
    seconds: float
    #: the phases in the order they ran, the operations outside every named phase in bands of their own (``other``)
    phases: list[Band]
    #: qualified module names; the series' ``module`` column indexes them
    modules: list[str]
    #: columns of equal length: op, seconds, module, and one per category in :data:`CATEGORIES`
    series: dict[str, list[Any]]
    hparams: dict[str, Any] = field(default_factory=dict)
    #: the cell's measured steps, read by the probes: peak and pre-build baseline per probe
    measured: dict[str, int] = field(default_factory=dict)
    baseline: dict[str, int] = field(default_factory=dict)
    #: CUDA: bytes the caching allocator held at the start of the step that no dispatched operation made
    #: (cuBLAS workspaces, say); None on CPU
    untracked_bytes: int | None = None
    #: the allocator snapshot of the step that PyTorch's memory viewer opens (CUDA), a file name beside this one
    snapshot: str | None = None
    schema: int = SCHEMA

    def totals(self) -> list[int]:
        """Live tracked bytes after each row of the series."""
        columns = [self.series[c] for c in CATEGORIES]
        return [sum(row) for row in zip(*columns, strict=True)]

    def phase_at(self, op: int) -> str:
        """The phase band that holds operation ``op`` (counted from 1; a band's operations are start + 1 … end)."""
        for band in self.phases:
            if band.start < op <= band.end or op == band.start == 0:
                return band.name
        return OTHER

    def peak(self) -> Peak:
        """The first row with the most tracked bytes."""
        totals = self.totals()
        row = max(range(len(totals)), key=totals.__getitem__)
        op = self.series["op"][row]
        return Peak(row=row, op=op, bytes=totals[row], phase=self.phase_at(op),
                    module=self.modules[self.series["module"][row]],
                    categories={c: self.series[c][row] for c in CATEGORIES})

    def category_peak(self, category: str) -> int:
        """The most bytes ``category`` held at once during the step."""
        return max(self.series[category])

    @property
    def process_probe(self) -> str:
        """The probe the tracked peak compares with: the live tensors (``torch_allocated``) on a GPU, the process
        high-water mark above its pre-build floor on CPU."""
        return "torch_allocated" if self.device.startswith("cuda") else "cpu_hwm"

    def process_peak(self) -> int | None:
        """The measured steps' peak on :attr:`process_probe`, less the floor on CPU; None when it was not measured."""
        probe = self.process_probe
        if probe not in self.measured:
            return None
        floor = self.baseline.get(probe, 0) if probe == "cpu_hwm" else 0
        return self.measured[probe] - floor

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, keys in field order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        """A timeline from its JSON object; unknown keys and another schema are errors."""
        check_fields(cls, data, "timeline", SCHEMA)
        return cls(**{**data, "phases": [Band(*band) for band in data["phases"]]})

    def save(self, path: str | Path) -> None:
        """Write this timeline alone (what a measuring child leaves beside its record)."""
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Timeline:
        """The timeline :meth:`save` wrote."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def write(path: str | Path, timelines: Iterable[Timeline]) -> None:
    """Write ``timelines`` as one JSON document, replacing ``path`` atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    document = {"schema": SCHEMA, "categories": list(CATEGORIES), "timelines": [t.to_dict() for t in timelines]}
    tmp.write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)


def read(path: str | Path) -> list[Timeline]:
    """The timelines :func:`write` wrote; a file that does not parse raises :class:`RecordsError` naming it."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        return [Timeline.from_dict(t) for t in document["timelines"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordsError(f"{path}: not a memory timeline file ({exc}): remove it to measure afresh") from exc


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.(.+))?$")


def module_label(name: str) -> str:
    """A module's qualified name as a person reads it: ``layer 3 fc1``, ``head``, ``embed_tokens``, ``loss``."""
    if name in ("", LOSS):
        return name or "—"
    layer = _LAYER.search(name)
    if layer:
        return f"layer {layer.group(1)}" + (f" {layer.group(2)}" if layer.group(2) else "")
    if name.endswith("lm_head"):
        return "head"
    return name.rsplit(".", 1)[-1]
