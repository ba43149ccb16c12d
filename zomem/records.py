"""Records: one JSON object per measured cell, appended atomically to a JSON Lines file."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from zomem.errors import UsageError

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
    #: probe name -> peak bytes over the measured steps (of a multi-rank cell: the most any rank reached)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    #: multi-rank cells: each rank's peak bytes per probe, rank 0 first
    rank_peak_bytes: list[dict[str, int]] = field(default_factory=list)
    #: probe name -> bytes read before the model was built (the process floor)
    baseline_bytes: dict[str, int] = field(default_factory=dict)
    #: weights, trainable, optimizer_state, gradients, autocast_cache, transient -> bytes; and logits, the share
    #: of the transient that one forward's logits take
    breakdown: dict[str, int] = field(default_factory=dict)
    #: the probe whose peak the transient part of the breakdown was derived from
    breakdown_probe: str | None = None
    #: probe name -> how it read its peak, for probes with more than one way (cpu_hwm: clear_refs or psutil;
    #: nvml: process, device-minus-baseline or device; ``unavailable`` where NVML could not watch the GPU)
    probe_methods: dict[str, str] = field(default_factory=dict)
    #: CUDA cells: the card at the start, before the model was built (cuda_total, cuda_free, this process's context;
    #: where NVML reads the card, nvml_total and the driver's reserve = nvml_total - cuda_free - context) and, when
    #: emulating a smaller card, the allocator cap applied (the card's total less that reserve), in bytes
    cuda_memory: dict[str, int] = field(default_factory=dict)
    #: median, iqr (seconds) and n (steps)
    step_seconds: dict[str, float] = field(default_factory=dict)
    #: phase -> median seconds per step
    phases: dict[str, float] = field(default_factory=dict)
    forwards_per_step: float | None = None
    #: the optimizer's step count (from 0) at the first measured step: past the warm-up, and past each method's own
    #: start-up (a full AdaMeZO window, ZO-AdaMU's annealed phase)
    timed_from_step: int | None = None
    steps: int | None = None
    warmup: int | None = None
    #: examples per warm-up step, when fewer than the workload's batch
    warmup_batch: int | None = None
    candidates: int = 1
    #: ``pure`` (every tensor in ``dtype``) or ``mixed`` (float32 weights, forwards under autocast in ``dtype``)
    precision: str = "pure"
    #: whether each decoder layer's activations were recomputed in backward instead of kept (gradient checkpointing)
    checkpointing: bool = False
    #: processes the cell ran as, one per device, and how they shared the model (``fsdp``, ``replicate``,
    #: ``pipeline``; None: one process holding everything)
    ranks: int = 1
    strategy: str | None = None
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
    def method(self) -> str:
        """The optimizer as tables name it: ``adam + checkpointing`` for a checkpointed cell, ``mezo [fsdp x2]`` for
        one run as two FSDP ranks."""
        return method_label(self.optimizer, self.checkpointing, self.ranks, self.strategy)

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        """What identifies a cell: two records with the same key measured the same thing (a mixed-precision cell's
        dtype reads ``mixed-bfloat16``, a checkpointed cell's optimizer ``adam + checkpointing`` and a multi-rank
        one's ``mezo [fsdp x2]``, so other cells keep the names they had before those were recorded)."""
        dtype = self.dtype if self.precision == "pure" else f"mixed-{self.dtype}"
        return (self.model, self.method, self.workload, self.tuning, dtype, self.device)

    def to_json(self) -> str:
        """One line of JSON, keys in field order."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """A record from its JSON object; unknown keys are an error, not silently dropped."""
        check_fields(cls, data, "record", SCHEMA)
        return cls(**data)


def check_fields(cls: type, data: dict[str, Any], kind: str, schema: int) -> None:
    """Refuse a JSON object with keys the dataclass ``cls`` lacks, or of another ``schema`` than this one."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {kind} fields: {', '.join(unknown)}")
    if data.get("schema", schema) != schema:
        raise ValueError(f"{kind} schema {data.get('schema')} is not {schema}")


def method_label(optimizer: str, checkpointing: bool, ranks: int = 1, strategy: str | None = None) -> str:
    """``optimizer``, with `` + checkpointing`` when the cell recomputes activations in backward and `` [fsdp x2]``
    when it ran as several ranks (or under a strategy)."""
    label = f"{optimizer} + checkpointing" if checkpointing else optimizer
    return f"{label} [{strategy} x{ranks}]" if strategy is not None else label


def check_appendable(path: Path, option: str = "--out") -> None:
    """Raise :class:`UsageError` saying why records could not be appended to ``path`` (a folder, a file that cannot be
    written, a place where no folder can be made), before a cell is measured rather than after; creates nothing."""
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
            return
        parent = next(p for p in path.parents if p.exists())
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise UsageError(f"cannot append records to {path}: {exc.strerror or exc}; {option} takes a file that can be "
                         "written") from exc


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
