"""Option parsers shared by the commands that run cells."""

from __future__ import annotations

import argparse
import json
from typing import Any

from zomem.cell import PRECISIONS
from zomem.models import DTYPES, TUNINGS
from zomem.strategies import STRATEGIES


def parse_hparam(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``, the value read as JSON when it parses (numbers, lists, null) and as a string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def whole_number(text: str) -> int:
    """A whole number, 0 or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    """A whole number, at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def add_cell_options(parser: argparse.ArgumentParser, *, steps: int | None = 3, steps_help: str | None = None) -> None:
    """Options that shape how each cell runs: device, dtype, precision, tuning, checkpointing, ranks and strategy,
    steps, hyper-parameters.

    ``steps=None`` leaves the step count to the command (say how in ``steps_help``)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--precision", default="pure", choices=list(PRECISIONS),
                        help="pure: every tensor in --dtype (default); mixed: float32 weights, forwards under autocast "
                        "in --dtype (a half dtype), as Hugging Face Trainer's --bf16/--fp16")
    parser.add_argument("--tuning", default="full", choices=list(TUNINGS))
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing (first-order methods): each decoder layer recomputes its "
                        "activations in backward instead of keeping them")
    parser.add_argument("--ranks", type=positive_int, default=1, metavar="N",
                        help="run each cell as N processes, one per device (default: 1)")
    parser.add_argument("--strategy", default=None, choices=list(STRATEGIES),
                        help="how the ranks share the model: fsdp (shards; the default with --ranks > 1), replicate "
                        "(a whole model each, zeroth-order methods), pipeline (layers over N GPUs in one process)")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help or f"measured steps (default: {steps})")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps before peaks are reset (default: 1)")
    parser.add_argument("--hparam", type=parse_hparam, action="append", default=[], metavar="KEY=VALUE",
                        help="an optimizer hyper-parameter, e.g. --hparam lr=1e-6 (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a cell is stopped")
