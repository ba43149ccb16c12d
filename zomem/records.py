"""Records: one JSON object per measured cell, appended atomically to a JSON Lines file."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SCHEMA = 1
Status = Literal["ok", "oom", "error"]


class RecordsError(ValueError):
    """A records file that cannot be trusted: names the file and line."""


@dataclass
class Record:
    """The outcome of one cell: what ran, on what, and what the probes saw."""

    model: str
    optimizer: str
    workload: str
    tuning: str
    dtype: str
    device: str
    batch_size: int
    seq_len: int
    status: Status = "ok"
    error: str | None = None
    params: int | None = None
    trainable_params: int | None = None
    #: probe name -> peak bytes over the measured steps
    peak_bytes: dict[str, int] = field(default_factory=dict)
    #: probe name -> bytes read before the model was built (the process floor)
    baseline_bytes: dict[str, int] = field(default_factory=dict)
    #: weights, trainable, optimizer_state, gradients, transient -> bytes
    breakdown: dict[str, int] = field(default_factory=dict)
    #: the probe whose peak the transient part of the breakdown was derived from
    breakdown_probe: str | None = None
    #: probe name -> how it read its peak, for probes with more than one way (cpu_hwm: clear_refs or psutil;
    #: nvml: process, device-minus-baseline or device)
    probe_methods: dict[str, str] = field(default_factory=dict)
    #: median, iqr (seconds) and n (steps)
    step_seconds: dict[str, float] = field(default_factory=dict)
    #: phase -> median seconds per step
    phases: dict[str, float] = field(default_factory=dict)
    forwards_per_step: float | None = None
    steps: int | None = None
    warmup: int | None = None
    #: examples per warm-up step, when fewer than the workload's batch
    warmup_batch: int | None = None
    candidates: int = 1
    state_dtype: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    time: str = ""
    schema: int = SCHEMA

    @property
    def error_line(self) -> str:
        """The first line of ``error`` ("" when there is none), for one-line messages."""
        return self.error.splitlines()[0] if self.error else ""

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        """What identifies a cell: two records with the same key measured the same thing."""
        return (self.model, self.optimizer, self.workload, self.tuning, self.dtype, self.device)

    def to_json(self) -> str:
        """One line of JSON, keys in field order."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """A record from its JSON object; unknown keys are an error, not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown record fields: {', '.join(unknown)}")
        if data.get("schema", SCHEMA) != SCHEMA:
            raise ValueError(f"record schema {data.get('schema')} is not {SCHEMA}")
        return cls(**data)


def append(path: str | Path, record: Record) -> None:
    """Append ``record`` as one whole line: a killed run leaves whole lines only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (record.to_json() + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str | Path) -> list[Record]:
    """Every record in a JSON Lines file; a corrupt line raises :class:`RecordsError` with its number."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(Record.from_dict(json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise RecordsError(f"{path}:{number}: corrupt record: {exc}") from exc
    return records


def write(path: str | Path, records: Iterable[Record]) -> None:
    """Write ``records`` as a new file, replacing it atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
