"""``zomem overhead``: the decomposition of a MeZO step is printed with its verdict and what dominates."""

from __future__ import annotations

import pytest

from zomem.cli import main
from zomem.cli.overhead import Overhead


def test_budget_is_two_forwards_and_four_generations() -> None:
    result = Overhead(forward=1.0, generate=0.25, perturb=0.3, step=3.2, phases={})
    assert result.budget == 3.0 and result.ratio == pytest.approx(3.2 / 3.0)


def test_prints_the_decomposition(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["overhead", "--model", "opt-tiny", "--rounds", "1"])
    out = capsys.readouterr().out
    assert status in (0, 1)  # opt-tiny's step is mostly Python overhead: the verdict is not the point here
    for line in ("forward pass", "generate z for every parameter", "MeZO step", "step / budget", "dominant:"):
        assert line in out
