"""``zomem blocks``: the fit of a walk's cost per element and per block."""

from __future__ import annotations

import pytest

from zomem.cli import blocks
from zomem.cli import main as cli


def test_the_fit_recovers_known_costs() -> None:
    sweep = blocks.Sweep(1 << 20, {}, per_element=5e-12, per_block=10e-6)
    # 90% on elements needs B·5 ps ≥ 9 × 10 µs: 18M elements, so the next power of two, 2^25
    assert sweep.saturating_block == 1 << 25
    assert sweep.efficiency(1 << 25) >= blocks.SATURATED > sweep.efficiency(1 << 24)


def test_a_real_sweep_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["blocks", "--elements", "65536", "--sizes", "256", "4096", "65536", "131072", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "ns per element" in out and "µs per" in out
    assert "131,072 |" not in out  # a block larger than the tensor is not timed
    sweep = blocks.measure("cpu", 65536, (256, 65536), 1)
    assert set(sweep.seconds) == {256, 65536} and sweep.per_element > 0
    assert sweep.efficiency(65536) > sweep.efficiency(256)
