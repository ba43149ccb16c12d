"""``zomem trajectories``: optimisation paths on six 2-D test functions, drawn as one figure with a table."""

from __future__ import annotations

import argparse
from pathlib import Path

from tabulate import tabulate

from zomem import optim
from zomem.cli.options import positive_int
from zomem.trajectories import DEFAULT_OPTIMIZERS, DEFAULT_STEPS, NEIGHBOURHOOD, Path2D, draw, table_rows, trajectories

DEFAULT_OUT = Path("out/trajectories")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem trajectories``."""
    parser = sub.add_parser("trajectories", help="draw optimizers' paths on six 2-D test functions (PNG, SVG, table)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"step budget of every path; learning rates decay to 0 over it (default: {DEFAULT_STEPS})")
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS),
                        help=f"registered names or module:Class (default: {' '.join(DEFAULT_OPTIMIZERS)})")
    parser.set_defaults(func=main)


def markdown(paths: list[Path2D], steps: int) -> str:
    """The table as a Markdown section that says how it was made."""
    headers, rows = table_rows(paths)
    rows = [[cell.replace("|", "\\|") for cell in row] for row in rows]  # |x| would end a Markdown cell
    return (f"## Final distance to the optimum after {steps} steps\n\n"
            f"In brackets: the first step within {NEIGHBOURHOOD} of the optimum. Learning rates per function are "
            "in zomem/trajectories.py, cosine-decayed to 0 over the budget.\n\n"
            f"{tabulate(rows, headers=headers, tablefmt='github')}\n")


def main(args: argparse.Namespace) -> int:
    """Check the names, run every path, write the figure and the table, print the table."""
    for name in args.optimizers:
        optim.get(name)
    paths = trajectories(args.optimizers, args.steps)
    written = draw(paths, args.out)
    table = args.out / "trajectories.md"
    table.write_text(markdown(paths, args.steps))
    print(table.read_text())
    print("written: " + ", ".join(str(p) for p in [*written, table]))
    return 0
