"""``zomem trajectories``: every optimizer reaches the convex minima within the documented budget; figure and table."""

from __future__ import annotations

from pathlib import Path

import pytest

from zomem import optim
from zomem.cli import main
from zomem.trajectories import DEFAULT_OPTIMIZERS, DEFAULT_STEPS, FUNCTIONS, LEARNING_RATES, trajectory

CONVEX = [f for f in FUNCTIONS if f.key in "abc"]


def test_the_tuned_optimizers_are_adam_and_every_zeroth_order_one() -> None:
    zeroth_order = {n for n in optim.OPTIMIZERS.names() if issubclass(optim.get(n), optim.ZerothOrder)}
    assert set(LEARNING_RATES) == zeroth_order | {"adam"}
    assert set(DEFAULT_OPTIMIZERS) <= set(LEARNING_RATES)
    assert all(f.convex for f in CONVEX)


@pytest.mark.parametrize("name", list(LEARNING_RATES))
def test_reaches_the_minimum_of_each_convex_function_within_the_budget(name: str) -> None:
    for function in CONVEX:
        path = trajectory(name, function, DEFAULT_STEPS)
        assert path.steps_to_reach is not None, (
            f"{name} on ({function.key}) {function.formula}: closest {float(path.distances.min()):.3f}")


def test_cli_writes_the_figure_and_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trajectories", "--out", str(tmp_path), "--steps", "20"]) == 0
    png, svg, table = (tmp_path / f"trajectories.{ext}" for ext in ("png", "svg", "md"))
    assert png.read_bytes().startswith(b"\x89PNG") and "<svg" in svg.read_text()
    text = table.read_text()
    assert all(name in text for name in DEFAULT_OPTIMIZERS) and "(f) Rosenbrock" in text and "after 20 steps" in text
    assert text in capsys.readouterr().out


def test_cli_refuses_unknown_optimizers_and_empty_budgets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trajectories", "--out", str(tmp_path), "--optimizers", "meso"]) == 2
    assert "did you mean mezo" in capsys.readouterr().err.lower()
    with pytest.raises(SystemExit):
        main(["trajectories", "--steps", "0"])
