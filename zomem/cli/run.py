"""``zomem run``: measure one cell and append its record."""

from __future__ import annotations

import argparse
from pathlib import Path

from zomem import records
from zomem.cell import Cell
from zomem.cli.options import add_cell_options
from zomem.hardware import MIB
from zomem.harness import run_cell
from zomem.records import Record

DEFAULT_OUT = Path("reports/runs.jsonl")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem run``."""
    parser = sub.add_parser("run", help="measure one cell in a fresh process and append its record")
    parser.add_argument("--model", required=True, help="e.g. opt-125m (see `zomem list`)")
    parser.add_argument("--optimizer", required=True, help="a registered name or module:Class")
    parser.add_argument("--workload", required=True, help="e.g. sst2 or custom:batch=8,seq=512")
    add_cell_options(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"records file (default: {DEFAULT_OUT})")
    parser.set_defaults(func=main)


def summary(record: Record) -> str:
    """One line for a person: what ran, whether it fit, its peaks and its speed."""
    dtype = record.dtype if record.precision == "pure" else f"{record.dtype} (mixed)"
    cell = f"{record.model} {record.method} {record.workload} {record.tuning} {dtype} {record.device}"
    if record.status != "ok":
        return f"{cell}: {record.status}: {record.error_line}"
    peaks = ", ".join(f"{name} {value / MIB:,.0f} MiB" for name, value in record.peak_bytes.items())
    t = record.step_seconds
    return (f"{cell}: ok, peak {peaks}; {t['median']:.3f} s/step (IQR {t['iqr']:.3f}, n={t['n']}); "
            f"{record.forwards_per_step:g} forwards/step")


def main(args: argparse.Namespace) -> int:
    """Measure the cell, print its summary, append its record; exit 1 when the cell did not run ok."""
    cell = Cell(model=args.model, optimizer=args.optimizer, workload=args.workload, tuning=args.tuning,
                dtype=args.dtype, precision=args.precision, device=args.device, steps=args.steps, warmup=args.warmup,
                hparams=dict(args.hparam), checkpointing=args.checkpointing, ranks=args.ranks, strategy=args.strategy)
    records.check_appendable(args.out)
    record = run_cell(cell, out=args.out, timeout=args.timeout)
    print(f"{summary(record)} -> {args.out}")
    return 0 if record.status == "ok" else 1
