"""Tables rendered from records, never from live state."""

from __future__ import annotations

from collections.abc import Sequence

from tabulate import tabulate

from zomem.records import Record

MIB = 2**20
#: the probe a table reads on each device: what decides an out-of-memory there
PRIMARY_PROBE = {"cpu": "cpu_hwm", "cuda": "nvml"}


def primary_probe(record: Record) -> str:
    """The probe whose peak a table shows for ``record``'s device."""
    return PRIMARY_PROBE[record.device.split(":")[0]]


def _axes(records: Sequence[Record]) -> tuple[list[str], list[str]]:
    optimizers = list(dict.fromkeys(r.optimizer for r in records))
    workloads = list(dict.fromkeys(r.workload for r in records))
    return optimizers, workloads


def _latest(records: Sequence[Record]) -> dict[tuple[str, str], Record]:
    return {(r.optimizer, r.workload): r for r in records}


def peak_memory_rows(records: Sequence[Record], baseline: str = "mezo") -> tuple[list[str], list[list[str]]]:
    """Optimizers × workloads: peak MiB from the device's primary probe, and the ratio to ``baseline``."""
    optimizers, workloads = _axes(records)
    cells = _latest(records)
    rows = []
    for optimizer in optimizers:
        row = [optimizer]
        for workload in workloads:
            record = cells.get((optimizer, workload))
            if record is None:
                row.append("—")
            elif record.status != "ok":
                row.append(record.status.upper())
            else:
                probe = primary_probe(record)
                peak = record.peak_bytes[probe]
                base = cells.get((baseline, workload))
                ratio = (f" ({peak / base.peak_bytes[probe]:.2f}×)"
                         if base is not None and base.status == "ok" else "")
                row.append(f"{peak / MIB:,.0f}{ratio}")
        rows.append(row)
    return ["optimizer", *workloads], rows


def step_time_rows(records: Sequence[Record]) -> tuple[list[str], list[list[str]]]:
    """Optimizers × workloads: median seconds per step (IQR), and forward passes per step."""
    optimizers, workloads = _axes(records)
    cells = _latest(records)
    rows = []
    for optimizer in optimizers:
        row, forwards = [optimizer], "—"
        for workload in workloads:
            record = cells.get((optimizer, workload))
            if record is None or record.status != "ok":
                row.append(record.status.upper() if record else "—")
                continue
            t = record.step_seconds
            row.append(f"{t['median']:.3f} ({t['iqr']:.3f})")
            forwards = f"{record.forwards_per_step:g}"
        rows.append([*row, forwards])
    return ["optimizer", *workloads, "forwards/step"], rows


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
