"""``zomem timeline``: track one step of each optimizer and draw where, and why, its memory peaks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zomem import sweep, timeline_report
from zomem.cli.options import add_cell_options
from zomem.cli.report import settings

DEFAULT_OUT = Path("out/timeline")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem timeline``."""
    parser = sub.add_parser("timeline", help="draw live tensor memory over one step of each optimizer",
                            description="For each optimizer, one more step after the cell's measured ones, in the "
                            "cell's own child process, tracked at every tensor allocation and free: a figure of "
                            "memory by category over the step's phases, a table of each peak, the series as JSON "
                            "and, on CUDA, the allocator snapshot PyTorch's memory viewer opens.")
    parser.add_argument("--model", required=True, help="e.g. opt-125m (see `zomem list`)")
    parser.add_argument("--optimizers", nargs="+", required=True, help="registered names or module:Class")
    parser.add_argument("--workload", required=True, help="e.g. sst2 or custom:batch=8,seq=512")
    add_cell_options(parser, steps=None, steps_help="measured steps before the tracked one (default: 1 on CPU, 3 on "
                     "a GPU)")
    parser.add_argument("--warmup-batch", type=int, default=None, metavar="N",
                        help="examples per warm-up step (default: 1 on CPU, the workload's batch on a GPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder (default: {DEFAULT_OUT})")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Track each optimizer's step, write the folder and print the table; exit 1 when a cell did not run ok."""
    chosen = settings(args)
    cells = sweep.plan([args.model], args.optimizers, [args.workload], chosen)
    with sweep.locked(args.out):
        found, failed = sweep.Tracking(cells, args.out / f"{timeline_report.NAME}.json").finish(chosen.timeout)
        for record in failed:
            print(f"zomem timeline: {record.optimizer}: {record.status}: {record.error_line}", file=sys.stderr)
        if not found:
            return 1
        _, tracked = timeline_report.write(args.out, found)
    print(tracked.markdown())
    print(f"timeline: {args.out / (timeline_report.NAME + '.png')}")
    return 1 if failed else 0
