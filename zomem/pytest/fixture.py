"""The ``zomem`` fixture: what a test touches to measure a cell, so that limits and baselines see its peaks.

Memory comes from a fresh child process per cell (:func:`zomem.harness.run_cell`): a long-lived pytest
process carries earlier tests' allocator caches, CUDA modules and heap, so its own peaks depend on what
ran before. Time comes from pytest-benchmark in this process, after the child has finished.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pytest

from zomem.compare import Measurement, cell_name

if TYPE_CHECKING:
    import torch
    from pytest_benchmark.fixture import BenchmarkFixture

    from zomem.cell import Cell
    from zomem.pytest.session import ZomemSession
    from zomem.records import Record


def _synchronizer(device: torch.device) -> Callable[[], None]:
    import torch

    # pytest-benchmark reads a wall clock: the device's queued work must finish inside the timed call.
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _release(device: torch.device) -> None:
    import torch

    gc.collect()  # models and optimizers hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(benchmark: BenchmarkFixture, cell: Cell) -> float | None:
    """Build ``cell`` here, run ``cell.warmup`` untimed steps, time ``cell.steps`` rounds of one step each.

    Returns the median seconds per step, or None when benchmarks are disabled (one untimed step).
    """
    from zomem.measure import prepare

    # The benchmark times whole steps; per-phase times are the child's record's.
    prepared = prepare(dataclasses.replace(cell, phases=False))
    device = prepared.device
    synchronize = _synchronizer(device)

    def step() -> None:
        prepared.step()
        synchronize()

    try:
        benchmark.pedantic(step, setup=synchronize, rounds=cell.steps, warmup_rounds=cell.warmup, iterations=1)
    finally:
        # Free the model before the next test's child process needs the device.
        del prepared, step
        _release(device)
    return benchmark.stats.stats.median if benchmark.stats else None


class ZomemFixture:
    """Measures cells for one test; the ``zomem_limit`` marker and ``--zomem-save/--zomem-compare`` read them."""

    def __init__(self, nodeid: str, session: ZomemSession) -> None:
        self.nodeid = nodeid
        self.session = session
        #: what this test measured, in order
        self.measurements: list[Measurement] = []

    def add(self, measurement: Measurement, machine: Mapping[str, Any] | None = None) -> Measurement:
        """Expose a measurement to the marker and the baseline."""
        self.measurements.append(measurement)
        self.session.add(measurement, dict(machine or {}))
        return measurement

    def report_peaks(self, peak_bytes: Mapping[str, int], *, name: str | None = None,
                     seconds: float | None = None) -> Measurement:
        """Expose peaks measured some other way (probe name → bytes), named ``name`` or this test's id."""
        peaks = {probe: int(peak) for probe, peak in peak_bytes.items()}
        return self.add(Measurement(name or self.nodeid, "ok", peaks, seconds))

    def measure(self, cell: Cell) -> Record:
        """Measure ``cell`` in a fresh child process and expose its peaks; the record says how it went."""
        from zomem import harness

        record = harness.run_cell(cell)
        self.add(Measurement.from_record(record), record.env)
        return record

    def benchmark_step(self, benchmark: BenchmarkFixture, cell: Cell) -> Record:
        """Benchmark one training step of ``cell``: peaks from a fresh child, time from pedantic rounds here (from rank
        0's clock, for a cell run as several ranks).

        The child's record goes into ``benchmark.extra_info``. A cell that runs out of memory is skipped
        (its baseline entry says ``oom``); one whose child fails fails the test with the child's error.
        """
        from zomem import harness

        record = harness.run_cell(cell)
        dtype = cell.dtype if cell.precision == "pure" else f"mixed-{cell.dtype}"
        benchmark.group = f"{cell.model} {cell.tuning} {dtype} {cell.device}"
        benchmark.extra_info.update(dataclasses.asdict(record))
        if record.status != "ok":
            self.add(Measurement.from_record(record), record.env)
            if record.status == "oom":
                pytest.skip(f"{cell_name(record)}: out of memory: {record.error_line}")
            pytest.fail(f"{cell_name(record)}: the measuring child failed: {record.error}", pytrace=False)
        if cell.strategy is None:
            # The benchmark's own median, or none when benchmarks are disabled: never the child's phase-timed steps.
            seconds = time_steps(benchmark, cell)
        else:
            # This process cannot be one of several ranks: their step is the one rank 0 timed.
            seconds = record.step_seconds["median"]
        self.add(dataclasses.replace(Measurement.from_record(record), seconds=seconds), record.env)
        return record
