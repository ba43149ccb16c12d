"""``zomem report``: run the cells of a sweep and print its tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from zomem import report
from zomem.cell import Cell
from zomem.cli.options import add_cell_options
from zomem.harness import run_cell

DEFAULT_MODELS = ["opt-125m"]
DEFAULT_OPTIMIZERS = ["inference", "mezo", "adam"]
DEFAULT_WORKLOADS = ["sst2", "copa", "squad"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem report``."""
    parser = sub.add_parser("report", help="measure a sweep of cells and print its tables")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS)
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS)
    parser.add_argument("--out", type=Path, default=Path("out/report"), help="report folder (default: out/report)")
    add_cell_options(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Validate every cell first, then measure them one child process at a time."""
    cells = [Cell(model=m, optimizer=o, workload=w, tuning=args.tuning, dtype=args.dtype, device=args.device,
                  steps=args.steps, warmup=args.warmup, hparams=dict(args.hparam)).validated()
             for m in args.models for w in args.workloads for o in args.optimizers]
    out = args.out / "records.jsonl"
    measured = []
    for cell in tqdm(cells, desc="cells", unit="cell"):
        measured.append(run_cell(cell, out=out, timeout=args.timeout))
    for model in args.models:
        of_model = [r for r in measured if r.model == model]
        print(f"\n## Peak memory, MiB ({model}, ratio to mezo)\n")
        print(report.markdown(*report.peak_memory_rows(of_model)))
        print(f"\n## Step time, seconds ({model}, median (IQR))\n")
        print(report.markdown(*report.step_time_rows(of_model)))
    print(f"\nrecords: {out}")
    return 0
