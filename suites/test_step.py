"""One training step of every optimizer on every workload, benchmarked with pytest-benchmark.

    pytest suites/ --zomem-model opt-125m --zomem-device auto --benchmark-json out.json

The grid comes from the zomem plugin's options (``--zomem-optimizers``, ``--zomem-workloads``,
``--zomem-dtype``, ``--zomem-rounds``, ``--zomem-warmup``). Each cell's peaks are measured in a fresh
child process and its step timed here; ``extra_info`` carries the child's record (peak bytes per probe,
memory breakdown, forwards per step). Seeds are fixed: the model, batch and perturbations repeat.
"""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture

from zomem.cell import Cell
from zomem.pytest.fixture import ZomemFixture


def test_step(benchmark: BenchmarkFixture, zomem: ZomemFixture, zomem_cell: Cell) -> None:
    record = zomem.benchmark_step(benchmark, zomem_cell)
    # Every benchmark file must carry the memory figures, or a dashboard would track time alone.
    assert record.peak_bytes and record.forwards_per_step
    assert benchmark.extra_info["peak_bytes"] == record.peak_bytes
