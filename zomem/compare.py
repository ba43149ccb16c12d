"""Compare two runs cell by cell: peak bytes per probe and step time, against regression thresholds.

A run is a records file (JSON Lines), a pytest-benchmark JSON file (zomem's suites put each cell's
record in ``extra_info``) or a baseline saved by the pytest plugin's ``--zomem-save``. Every file
becomes :class:`Measurement` objects named by cell, so any two can be compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tabulate import tabulate

from zomem.hardware import MIB
from zomem.records import Record, RecordsError, read
BASELINE_SCHEMA = 1
#: the probes a peak can come from (zomem.probes); named here so that parsing a threshold imports no torch
PROBES = ("cpu_hwm", "torch_allocated", "torch_reserved", "nvml")
#: threshold metrics besides the probe names: every probe's peak, and the median step time
METRICS = ("peak", "time")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(Record))

Verdict = Literal["ok", "regression", "improved", "changed", "unchecked", "only in base", "only in new"]


def parse_bytes(text: str | int) -> int:
    """Bytes from ``"6 GiB"``, ``"512MiB"``, ``"1.5 GB"`` or a plain number."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size: expected e.g. '6 GiB', '512MiB', '1.5 GB' or bytes")
    number, unit = match.groups()
    return round(float(number) * _UNITS[(unit or "").lower()])


def format_bytes(n: float) -> str:
    """Bytes as MiB, the unit the tables use."""
    return f"{n / MIB:,.1f} MiB"


def format_seconds(s: float) -> str:
    """Seconds, in milliseconds below one second."""
    return f"{s * 1000:,.2f} ms" if s < 1 else f"{s:,.3f} s"


@dataclass(frozen=True)
class Threshold:
    """The largest allowed increase of a metric, in percent of the base value."""

    #: ``peak`` (every probe), a probe name (that probe only), or ``time`` (median seconds per step)
    metric: str
    percent: float

    def __str__(self) -> str:
        return f"{self.metric}:+{self.percent:g}%"


def parse_thresholds(text: str) -> tuple[Threshold, ...]:
    """``"peak:+2%,time:+10%"``; a probe name (``"nvml:+1%"``) overrides ``peak`` for that probe; ``""`` is none."""
    thresholds = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"([a-z_]+):\+?(\d+(?:\.\d+)?)%", item)
        if not match or match[1] not in METRICS + PROBES:
            raise argparse.ArgumentTypeError(
                f"cannot read threshold {item!r}: expected METRIC:+PERCENT% with METRIC one of "
                f"{', '.join(METRICS + PROBES)}, e.g. 'peak:+2%,time:+10%'"
            )
        thresholds.append(Threshold(match[1], float(match[2])))
    return tuple(thresholds)


def add_fail_option(addoption: Callable[..., Any], flag: str, default: str) -> None:
    """The thresholds option, shared by ``zomem compare --fail-on`` and the plugin's ``--zomem-fail``."""
    shown = default.replace("%", "%%") or "none, only show"  # argparse %-formats help strings
    addoption(flag, type=parse_thresholds, default=parse_thresholds(default), metavar="METRIC:+PCT%[,...]",
              help=f"fail on an increase beyond these thresholds, e.g. 'peak:+2%%,time:+10%%'; metrics: "
              f"{', '.join(METRICS + PROBES)}; a probe name overrides 'peak' for that probe (default: {shown})")


def cell_name(record: Record) -> str:
    """The name a cell is matched by across runs: model/optimizer/workload/tuning/dtype/device."""
    return "/".join(record.key)


@dataclass(frozen=True)
class Measurement:
    """One cell as compared: its status, peak bytes per probe and median seconds per step."""

    name: str
    status: str = "ok"
    peak_bytes: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None

    @classmethod
    def from_record(cls, record: Record, seconds: float | None = None) -> Measurement:
        """The figures of ``record``; ``seconds`` replaces the record's median step time when given."""
        median = record.step_seconds.get("median")
        return cls(cell_name(record), record.status, dict(record.peak_bytes), median if seconds is None else seconds)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of a baseline entry."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        """The measurement :meth:`to_dict` wrote."""
        return cls(**data)


@dataclass
class Baseline:
    """Measurements saved by the plugin's ``--zomem-save``: what a later run is compared against."""

    measurements: list[Measurement]
    #: UTC ISO 8601
    saved: str = ""
    #: what ran them: the ``env`` of the first record measured, when there was one
    machine: dict[str, Any] = field(default_factory=dict)
    schema: int = BASELINE_SCHEMA

    def to_json(self) -> str:
        """The baseline file's text."""
        data = {"schema": self.schema, "saved": self.saved, "machine": self.machine,
                "measurements": [m.to_dict() for m in self.measurements]}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Baseline:
        """The baseline :meth:`to_json` wrote; another schema is an error, not a guess."""
        data = json.loads(text)
        if data.get("schema") != BASELINE_SCHEMA:
            raise ValueError(f"baseline schema {data.get('schema')} is not {BASELINE_SCHEMA}")
        return cls([Measurement.from_dict(m) for m in data["measurements"]], data["saved"], data["machine"])

    def save(self, path: Path) -> None:
        """Write the baseline, creating its folder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")


def now() -> str:
    """The time now, as records write it."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class Run:
    """The measurements of one file, by cell name; a cell measured more than once keeps its last figures."""

    path: Path
    kind: Literal["records", "pytest-benchmark", "baseline"]
    measurements: dict[str, Measurement]
    #: cells the file holds more than once (an appended records file re-run, say)
    repeated: list[str] = field(default_factory=list)


def _collect(measurements: Iterable[Measurement]) -> tuple[dict[str, Measurement], list[str]]:
    by_name: dict[str, Measurement] = {}
    repeated = []
    for m in measurements:
        if m.name in by_name and m.name not in repeated:
            repeated.append(m.name)
        by_name[m.name] = m
    return by_name, repeated


def _from_benchmark(bench: Mapping[str, Any]) -> Measurement:
    # zomem's suites put the cell's record in extra_info; any other benchmark is named by its test id.
    extra = bench.get("extra_info") or {}
    seconds = (bench.get("stats") or {}).get("median")
    if "peak_bytes" in extra and "model" in extra:
        record = Record.from_dict({k: v for k, v in extra.items() if k in _RECORD_FIELDS})
        return Measurement.from_record(record, seconds)
    return Measurement(bench["fullname"], extra.get("status", "ok"), dict(extra.get("peak_bytes", {})), seconds)


def load(path: str | Path) -> Run:
    """A run from a records file, a pytest-benchmark JSON file or a saved baseline (told apart by content)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordsError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # several lines: a records file
    try:
        if isinstance(data, dict) and "benchmarks" in data:
            by_name, repeated = _collect(_from_benchmark(b) for b in data["benchmarks"])
            return Run(path, "pytest-benchmark", by_name, repeated)
        if isinstance(data, dict) and "measurements" in data:
            by_name, repeated = _collect(Baseline.from_json(text).measurements)
            return Run(path, "baseline", by_name, repeated)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordsError(f"{path}: not a pytest-benchmark or zomem baseline file I can read: {exc}") from exc
    by_name, repeated = _collect(Measurement.from_record(r) for r in read(path))
    return Run(path, "records", by_name, repeated)


@dataclass(frozen=True)
class Change:
    """One metric of one cell in both runs, and what the thresholds make of it."""

    cell: str
    #: a probe name, ``time``, ``status`` or ``cell`` (present on one side only)
    metric: str
    base: float | str | None
    new: float | str | None
    verdict: Verdict
    threshold: Threshold | None = None

    @property
    def percent(self) -> float | None:
        """The change in percent of the base value, when both are numbers."""
        if not isinstance(self.base, (int, float)) or not isinstance(self.new, (int, float)):
            return None
        if self.base == 0:
            return 0.0 if self.new == 0 else math.inf
        return (self.new - self.base) / self.base * 100

    def row(self) -> list[str]:
        """The table row: cell, metric, base, new, change, verdict."""
        percent = self.percent
        change = "" if percent is None else f"{percent:+.1f}%"
        verdict = f"{self.verdict} (> {self.threshold})" if self.verdict == "regression" else self.verdict
        return [self.cell, self.metric, self._show(self.base), self._show(self.new), change, verdict]

    def _show(self, value: float | str | None) -> str:
        if value is None:
            return "—"
        if isinstance(value, str):
            return value
        return format_seconds(value) if self.metric == "time" else format_bytes(value)


def _judge(cell: str, metric: str, base: float, new: float, threshold: Threshold | None) -> Change:
    change = Change(cell, metric, base, new, "unchecked", threshold)
    if threshold is None:
        return change
    percent = change.percent
    assert percent is not None
    verdict: Verdict = "regression" if percent > threshold.percent else (
        "improved" if percent < -threshold.percent else "ok")
    return dataclasses.replace(change, verdict=verdict)


def _cell_changes(base: Measurement, new: Measurement, thresholds: Mapping[str, Threshold]) -> list[Change]:
    name = new.name
    if base.status != new.status:
        # A cell that ran and now does not is a regression whatever the thresholds say.
        verdict: Verdict = "regression" if base.status == "ok" else ("improved" if new.status == "ok" else "changed")
        return [Change(name, "status", base.status, new.status, verdict)]
    if new.status != "ok":
        return [Change(name, "status", base.status, new.status, "unchecked")]
    changes = []
    for probe in sorted(base.peak_bytes.keys() | new.peak_bytes.keys()):
        if probe not in new.peak_bytes:
            changes.append(Change(name, probe, base.peak_bytes[probe], None, "only in base"))
        elif probe not in base.peak_bytes:
            changes.append(Change(name, probe, None, new.peak_bytes[probe], "only in new"))
        else:
            threshold = thresholds.get(probe, thresholds.get("peak"))
            changes.append(_judge(name, probe, base.peak_bytes[probe], new.peak_bytes[probe], threshold))
    if base.seconds is not None and new.seconds is not None:
        changes.append(_judge(name, "time", base.seconds, new.seconds, thresholds.get("time")))
    return changes


@dataclass
class Comparison:
    """Every change between two runs; it fails when any is a regression."""

    changes: list[Change]
    thresholds: tuple[Threshold, ...] = ()

    @property
    def regressions(self) -> list[Change]:
        """The changes beyond their thresholds, and cells that stopped running."""
        return [c for c in self.changes if c.verdict == "regression"]

    @property
    def one_sided(self) -> list[Change]:
        """Cells measured in only one of the runs."""
        return [c for c in self.changes if c.metric == "cell"]

    @property
    def failed(self) -> bool:
        """Whether the new run regressed."""
        return bool(self.regressions)

    def table(self) -> str:
        """The changes as a GitHub-flavoured Markdown table."""
        return tabulate([c.row() for c in self.changes],
                        headers=("cell", "metric", "base", "new", "change", "verdict"), tablefmt="github")

    def summary(self) -> str:
        """One line: how many regressions, against which thresholds, and the one-sided cells."""
        limits = ", ".join(map(str, self.thresholds)) or "none"
        cells = len({c.cell for c in self.changes})
        line = f"{len(self.regressions)} regression(s) in {cells} cell(s) (thresholds: {limits})"
        if self.one_sided:
            line += f"; {len(self.one_sided)} cell(s) measured on one side only"
        return line


def compare(base: Mapping[str, Measurement], new: Mapping[str, Measurement],
            thresholds: Iterable[Threshold] = ()) -> Comparison:
    """Compare ``new`` with ``base`` cell by cell; cells on one side only are listed, not dropped."""
    thresholds = tuple(thresholds)
    by_metric = {t.metric: t for t in thresholds}
    changes = []
    for name in sorted(base.keys() | new.keys()):
        if name not in new:
            changes.append(Change(name, "cell", "measured", None, "only in base"))
        elif name not in base:
            changes.append(Change(name, "cell", None, "measured", "only in new"))
        else:
            changes.extend(_cell_changes(base[name], new[name], by_metric))
    return Comparison(changes, thresholds)


def github_benchmarks(measurements: Iterable[Measurement]) -> list[dict[str, Any]]:
    """The ``customSmallerIsBetter`` entries github-action-benchmark reads: each peak in MiB, each step time in s."""
    entries: list[dict[str, Any]] = []
    for m in measurements:
        if m.status != "ok":
            continue
        for probe, peak in sorted(m.peak_bytes.items()):
            entries.append({"name": f"{m.name} peak {probe}", "unit": "MiB", "value": round(peak / MIB, 3)})
        if m.seconds is not None:
            entries.append({"name": f"{m.name} step time", "unit": "s", "value": m.seconds})
    return entries
