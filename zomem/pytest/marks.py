"""The ``zomem_limit`` marker: fail a test whose measured peak exceeds a limit.

A marker is a plain function that returns None when the test is within its limit and a
:class:`LimitFailure` that describes the failure otherwise; the plugin turns that into the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tabulate import tabulate

from zomem.compare import PROBES, Measurement, format_bytes, parse_bytes


@dataclass(frozen=True)
class Limit:
    """At most ``bytes`` of peak under ``probe``, or under every probe a test measured when it is None."""

    bytes: int
    probe: str | None = None

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.probe or 'every probe'})"


def parse_limit(limit: str | int, *, probe: str | None = None) -> Limit:
    """The marker's arguments, checked: ``zomem_limit("6 GiB", probe="nvml")``."""
    if probe is not None and probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    return Limit(parse_bytes(limit), probe)


@dataclass(frozen=True)
class LimitFailure:
    """Why a test broke its limit: one line per problem, and the peaks it measured."""

    limit: Limit
    problems: list[str]
    measurements: Sequence[Measurement]

    @property
    def long_repr(self) -> str:
        """The line the test report shows."""
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"zomem_limit {self.limit}: {self.problems[0]}{more}"

    @property
    def section(self) -> tuple[str, str]:
        """A report section with every problem and every measured peak."""
        rows = [(m.name, m.status, probe, format_bytes(peak))
                for m in self.measurements for probe, peak in sorted(m.peak_bytes.items())]
        peaks = tabulate(rows, headers=("cell", "status", "probe", "peak"), tablefmt="github") if rows else "none"
        return "zomem_limit", "\n".join(self.problems) + f"\n\nmeasured peaks:\n{peaks}"


def limit_peak(limit: str | int, *, probe: str | None = None,
               _measurements: Sequence[Measurement]) -> LimitFailure | None:
    """None when every measured peak is within ``limit``; a named probe that was not measured is a failure."""
    parsed = parse_limit(limit, probe=probe)
    if not _measurements:
        return LimitFailure(parsed, ["the test measured no peak: measure through the zomem fixture "
                                     "(zomem.benchmark_step, zomem.measure or zomem.report_peaks)"], _measurements)
    problems = []
    for m in _measurements:
        if m.status != "ok":
            problems.append(f"{m.name} did not run ({m.status}), so its peak is unknown")
            continue
        if (probe is not None and probe not in m.peak_bytes) or not m.peak_bytes:
            # Never judge a limit on one probe by another's figure, nor pass a limit nothing was checked against.
            problems.append(f"{m.name}: probe {probe or 'any'} was not measured "
                            f"(measured: {', '.join(m.peak_bytes) or 'none'})")
            continue
        for name in [probe] if probe else sorted(m.peak_bytes):
            if m.peak_bytes[name] > parsed.bytes:
                problems.append(f"{m.name}: {name} peak {format_bytes(m.peak_bytes[name])} exceeds the limit")
    return LimitFailure(parsed, problems, _measurements) if problems else None
