"""The ``zomem`` command: one small module per sub-command (parser builder, compute, print)."""

from __future__ import annotations

import argparse
import os
import sys

from zomem.cli import calibrate, compare, estimate, fit, list_, overhead, report, run, trajectories
from zomem.errors import CellFailed, UsageError
from zomem.records import RecordsError

COMMANDS = (run, report, estimate, fit, calibrate, list_, compare, trajectories, overhead)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="zomem", description="Measure what fine-tuning optimizers cost.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input is a one-line message and exit status 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, RecordsError) as exc:
        print(f"zomem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CellFailed as exc:
        print(f"zomem {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`zomem list | head`): point stdout at /dev/null so the exit-time flush stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"zomem {args.command}: interrupted; records written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
