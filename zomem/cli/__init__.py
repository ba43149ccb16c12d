"""The ``zomem`` command: one small module per sub-command (parser builder, compute, print)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import types

from zomem.cli import (blocks, calibrate, compare, estimate, fit, gpucheck, list_, overhead, report, run, timeline,
                       trajectories)
from zomem.errors import CellFailed, Terminated, UsageError
from zomem.records import RecordsError

COMMANDS = (run, report, timeline, estimate, fit, calibrate, list_, compare, trajectories, overhead, blocks,
            gpucheck)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="zomem", description="Measure what fine-tuning optimizers cost.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _terminated(signum: int, frame: types.FrameType | None) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input is a one-line message and exit status 2, never a traceback; SIGTERM is met as Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
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
    except Terminated:
        print(f"zomem {args.command}: terminated (SIGTERM); records written so far are kept", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"zomem {args.command}: interrupted; records written so far are kept", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
