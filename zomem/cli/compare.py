"""``zomem compare``: compare two runs cell by cell and fail on a regression beyond the thresholds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zomem import compare
from zomem.compare import Comparison, Run

DEFAULT_FAIL_ON = "peak:+2%,time:+10%"
DEFAULT_GITHUB_OUT = Path("zomem-benchmark.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem compare``."""
    parser = sub.add_parser(
        "compare", help="compare two runs (records JSONL, pytest-benchmark JSON or a saved baseline)",
        description="Compare the peaks and step times of two runs cell by cell. Exit status 1 when a change "
        "goes beyond the thresholds or a cell that ran in BASE does not run in NEW, 0 otherwise.")
    parser.add_argument("base", type=Path, metavar="BASE", help="the run to compare against")
    parser.add_argument("new", type=Path, metavar="NEW", help="the run to judge")
    compare.add_fail_option(parser.add_argument, "--fail-on", DEFAULT_FAIL_ON)
    parser.add_argument("--export", choices=["github"],
                        help="also write NEW for a CI dashboard: 'github' is github-action-benchmark's "
                        "customSmallerIsBetter JSON")
    parser.add_argument("--output", type=Path, default=DEFAULT_GITHUB_OUT,
                        help=f"where --export writes (default: {DEFAULT_GITHUB_OUT})")
    parser.set_defaults(func=main)


def show(base: Run, new: Run, comparison: Comparison) -> None:
    """Print what was compared, the table and the verdict."""
    print(f"base: {base.path} ({base.kind}, {len(base.measurements)} cells)")
    print(f"new:  {new.path} ({new.kind}, {len(new.measurements)} cells)")
    for run in (base, new):
        if run.repeated:
            print(f"note: {run.path} measures {len(run.repeated)} cell(s) more than once; the last of each is compared")
    print()
    print(comparison.table())
    print()
    print(("FAILED: " if comparison.failed else "ok: ") + comparison.summary())


def main(args: argparse.Namespace) -> int:
    """Load both runs, print the comparison, export NEW when asked; exit 1 on a regression."""
    base, new = compare.load(args.base), compare.load(args.new)
    comparison = compare.compare(base.measurements, new.measurements, args.fail_on)
    show(base, new, comparison)
    if args.export == "github":
        entries = compare.github_benchmarks(new.measurements.values())
        args.output.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {len(entries)} github-action-benchmark entries to {args.output}")
    return 1 if comparison.failed else 0
