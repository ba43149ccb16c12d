"""Optimisation paths on 2-D test functions: the quickest visual check that an optimizer does what it claims.

Each optimizer starts from the same point on each function and takes ``steps`` steps (the budget, default
:data:`DEFAULT_STEPS`), its learning rate from :data:`LEARNING_RATES` cosine-decayed to zero over the budget,
its other hyper-parameters from :data:`HPARAMS` (seed 0 for the zeroth-order ones). Within that budget every
optimizer of :data:`LEARNING_RATES` comes within :data:`NEIGHBOURHOOD` of the minimum of each convex function
(a)–(c); tests/test_trajectories.py checks it. Where a method stays noisy (the kinked valley (b)), its final
distance may be larger again: the table reports both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zomem import optim

DEFAULT_STEPS = 1000
#: drawn by default: LOZO, SubZero and LeZO walk a 2-D point exactly as MeZO does, so their paths would hide under its
DEFAULT_OPTIMIZERS = ("adam", "mezo", "zo-adamu", "adamezo", "hizoo", "lozo-m", "sparse-mezo", "fzoo", "mezo-svrg")
#: "reached the minimum": distance to the optimum below this
NEIGHBOURHOOD = 0.1
#: learning rate on functions (a)…(f), the best of a small grid per optimizer: methods whose step grows with the
#: gradient need smaller ones on the steep Beale (e) and Rosenbrock (f); Adam- and sign-style steps do not
LEARNING_RATES: dict[str, tuple[float, float, float, float, float, float]] = {
    "adam": (0.1, 0.1, 0.1, 0.1, 0.1, 0.1),
    "mezo": (0.1, 0.1, 0.1, 0.1, 0.01, 0.001),
    "zo-sgd-mmt": (0.01, 0.01, 0.01, 0.01, 0.001, 0.0001),
    "zo-adam": (0.3, 0.3, 0.3, 0.3, 0.1, 0.1),
    "zo-sgd-sign": (0.05, 0.05, 0.05, 0.05, 0.01, 0.03),
    "zo-sgd-cons": (0.3, 0.3, 0.3, 0.3, 0.003, 0.01),
    "forward-grad": (0.1, 0.1, 0.1, 0.1, 0.01, 0.001),
    "zo-adamu": (0.2, 0.2, 0.2, 0.2, 0.01, 0.001),
    "hizoo": (0.1, 0.1, 0.1, 0.1, 0.01, 0.001),
    "adamezo": (0.1, 0.1, 0.1, 0.1, 0.1, 0.1),
    # a 2-D point is one vector: LOZO, SubZero and LeZO walk it as MeZO does
    "lozo": (0.1, 0.1, 0.1, 0.1, 0.01, 0.001),
    "lozo-m": (0.1, 0.1, 0.1, 0.3, 0.01, 0.001),
    "subzero": (0.1, 0.1, 0.1, 0.1, 0.01, 0.001),
    "sparse-mezo": (0.1, 0.1, 0.1, 0.1, 0.01, 0.001),
    "lezo": (0.1, 0.1, 0.1, 0.1, 0.01, 0.001),
    "fzoo": (0.3, 0.3, 0.3, 0.3, 0.1, 0.1),
    "mezo-svrg": (0.01, 0.03, 0.03, 0.03, 0.001, 0.0003),
}
#: optimizers not listed take their own defaults and this learning rate
FALLBACK_LR = 0.01
#: beyond the learning rate: HiZOO's Hessian must adapt within a thousand steps, not a million; Sparse MeZO's mask
#: must keep both coordinates of the point (⌈(1 − s)·2⌉ = 2), or the smaller one alone would move, for ever
HPARAMS: dict[str, dict[str, Any]] = {"hizoo": {"hessian_smooth": 1e-3}, "zo-sgd-mmt": {"momentum": 0.9},
                                      "sparse-mezo": {"sparsity": 0.25}}
#: MeZO-SVRG's snapshot steps take this multiple of its learning rate (η̄ = 3η)
SNAPSHOT_LR_RATIO = 3.0
Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TestFunction:
    """A 2-D function with its minimum, where paths start, and the box the figure shows."""

    key: str
    formula: str
    f: Fn
    optimum: tuple[float, float]
    start: tuple[float, float]
    box: tuple[float, float, float, float]  # x min, x max, y min, y max
    convex: bool


def _beale(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _rosenbrock(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


FUNCTIONS = (
    TestFunction("a", "|x| + |y|", lambda x, y: x.abs() + y.abs(), (0.0, 0.0), (-2.5, 2.0), (-3, 3, -3, 3), True),
    TestFunction("b", "|x + y| + |x − y|/10", lambda x, y: (x + y).abs() + (x - y).abs() / 10,
                 (0.0, 0.0), (-2.5, 2.0), (-3, 3, -3, 3), True),
    TestFunction("c", "(x + y)² + (x − y)²/10", lambda x, y: (x + y) ** 2 + (x - y) ** 2 / 10,
                 (0.0, 0.0), (-2.5, 2.0), (-3, 3, -3, 3), True),
    TestFunction("d", "|x|/10 + |y|", lambda x, y: x.abs() / 10 + y.abs(), (0.0, 0.0), (-2.5, 2.0), (-3, 3, -3, 3),
                 True),
    TestFunction("e", "Beale", _beale, (3.0, 0.5), (1.0, 1.5), (-0.5, 4.0, -1.0, 2.0), False),
    TestFunction("f", "Rosenbrock", _rosenbrock, (1.0, 1.0), (-1.5, 2.0), (-2.0, 2.0, -1.0, 3.0), False),
)


@dataclass
class Path2D:
    """One optimizer's path on one function."""

    function: TestFunction
    optimizer: str
    points: torch.Tensor  # (steps + 1, 2), the start first

    @property
    def distances(self) -> torch.Tensor:
        """Distance to the optimum after each step (the start first)."""
        return (self.points - torch.tensor(self.function.optimum, dtype=self.points.dtype)).norm(dim=1)

    @property
    def final_distance(self) -> float:
        """Distance from the last point to the optimum."""
        return float(self.distances[-1])

    @property
    def steps_to_reach(self) -> int | None:
        """The first step that ends within :data:`NEIGHBOURHOOD` of the optimum; None if the path never does."""
        inside = (self.distances < NEIGHBOURHOOD).nonzero()
        return int(inside[0]) if len(inside) else None


def hparams_for(name: str, function: TestFunction, steps: int) -> dict[str, Any]:
    """The optimizer's hyper-parameters on ``function``; ZO-AdaMU anneals over the whole budget; MeZO-SVRG's snapshot
    learning rate follows its learning rate."""
    index = [f.key for f in FUNCTIONS].index(function.key)
    hparams = {**HPARAMS.get(name, {}), "lr": LEARNING_RATES[name][index] if name in LEARNING_RATES else FALLBACK_LR}
    if name == "zo-adamu":
        hparams.update(total_steps=steps, t1=steps // 10)
    if name == "mezo-svrg":
        hparams["snapshot_lr"] = SNAPSHOT_LR_RATIO * hparams["lr"]
    return hparams


def trajectory(name: str, function: TestFunction, steps: int = DEFAULT_STEPS) -> Path2D:
    """Run ``name`` for ``steps`` steps on ``function`` from its start point, in float64."""
    point = torch.nn.Parameter(torch.tensor(function.start, dtype=torch.float64))
    optimizer = optim.create(name, [point], **hparams_for(name, function, steps))
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    forward_only = optim.forward_only(type(optimizer))

    def closure() -> torch.Tensor:
        if forward_only:
            with torch.no_grad():
                return function.f(point[0], point[1])
        optimizer.zero_grad()
        loss = function.f(point[0], point[1])
        loss.backward()
        return loss.detach()

    points = [point.detach().clone()]
    for _ in range(steps):
        optimizer.step(closure)
        decay.step()
        points.append(point.detach().clone())
    return Path2D(function, name, torch.stack(points))


def trajectories(names: Sequence[str] = DEFAULT_OPTIMIZERS, steps: int = DEFAULT_STEPS,
                 functions: Sequence[TestFunction] = FUNCTIONS) -> list[Path2D]:
    """Every optimizer's path on every function."""
    return [trajectory(name, function, steps) for function in functions for name in names]


def table_rows(paths: Sequence[Path2D]) -> tuple[list[str], list[list[str]]]:
    """One row per function, one column per optimizer: final distance to the optimum (first step within reach)."""
    names = list(dict.fromkeys(p.optimizer for p in paths))
    functions = list(dict.fromkeys(p.function for p in paths))
    by_cell = {(p.function.key, p.optimizer): p for p in paths}

    def cell(path: Path2D) -> str:
        reached = "never" if path.steps_to_reach is None else f"step {path.steps_to_reach}"
        return f"{path.final_distance:.2g} ({reached})"

    rows = [[f"({f.key}) {f.formula}", *(cell(by_cell[f.key, n]) for n in names)] for f in functions]
    return ["function", *names], rows


def draw(paths: Sequence[Path2D], out: Path) -> list[Path]:
    """One figure: a panel per function with its contours and a path per optimizer; written as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    functions = list(dict.fromkeys(p.function for p in paths))
    names = list(dict.fromkeys(p.optimizer for p in paths))
    colours = dict(zip(names, plt.get_cmap("tab10").colors, strict=False))
    columns = min(3, len(functions))
    rows = math.ceil(len(functions) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.6 * rows), squeeze=False)
    for ax, function in zip(axes.flat, functions, strict=False):
        x0, x1, y0, y1 = function.box
        xs, ys = torch.meshgrid(torch.linspace(x0, x1, 300, dtype=torch.float64),
                                torch.linspace(y0, y1, 300, dtype=torch.float64), indexing="xy")
        values = function.f(xs, ys)
        low = max(float(values.min()), 1e-3)
        # log-spaced levels show the steep walls and the flat floor alike; rasterised, as contour paths would make
        # the SVG megabytes
        levels = torch.logspace(math.log10(low), math.log10(float(values.max())), 30).numpy()
        ax.contourf(xs, ys, values.clamp_min(low), levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.55,
                    rasterized=True)
        for path in (p for p in paths if p.function == function):
            # thin, slightly transparent lines: the early zeroth-order steps are large and cross each other
            ax.plot(path.points[:, 0], path.points[:, 1], color=colours[path.optimizer], lw=0.8, alpha=0.85,
                    label=path.optimizer)
            ax.plot(*path.points[-1].tolist(), "o", color=colours[path.optimizer], mec="k", mew=0.6, ms=6, zorder=4)
        ax.plot(*function.start, "ks", ms=6, zorder=5)
        ax.plot(*function.optimum, "*", color="gold", mec="k", ms=14, zorder=5)
        ax.set(xlim=(x0, x1), ylim=(y0, y1), title=f"({function.key}) {function.formula}")
    for ax in axes.flat[len(functions):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), frameon=False)
    steps = len(paths[0].points) - 1
    fig.suptitle(f"Optimisation paths: {steps} steps from the square towards the star (dot: where each ends)")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "trajectories.png", out / "trajectories.svg"]
    for path in written:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return written
