"""``zomem gpu-check``: the prepared check of everything only a GPU can show, in one short run."""

from __future__ import annotations

import argparse
from pathlib import Path

from zomem import gpucheck
from zomem.cell import resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem gpu-check``."""
    parser = sub.add_parser("gpu-check", help="measure what only a GPU can show, in about five minutes",
                            description="GPU-marked tests, opt-1.3b cells under every probe, the MeZO step's "
                            "overhead, a capped measured fit, the suites, a candidate calibration and a page of "
                            "measured against predicted peaks. --device cpu is the dry run on opt-tiny.")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for the dry run (default: cuda)")
    parser.add_argument("--out", type=Path, default=Path("out/gpu-check"),
                        help="the results folder, written as the check goes (default: out/gpu-check)")
    parser.add_argument("--pack", type=Path, default=None, metavar="DIR",
                        help="at the end, write the folder as one archive and the log into DIR")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Refuse a missing GPU in one line; otherwise run the check (exit 1 when a step did not succeed)."""
    return gpucheck.run(resolve_device(args.device), args.out, args.pack)
