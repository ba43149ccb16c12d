"""``zomem estimate``: the predicted peak memory per GPU of one step, with its breakdown."""

from __future__ import annotations

import argparse
import json

from tabulate import tabulate

from zomem import estimate, models, strategies
from zomem.cli.options import parse_hparam
from zomem.estimate import Estimate
from zomem.hardware import GIB
from zomem.models import DTYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem estimate``."""
    parser = sub.add_parser("estimate", help="predict the peak memory per device of one optimizer step",
                            description="Predict peak bytes per device (weights, optimizer state, gradients, "
                            "transient, per-device overhead) without running anything.")
    parser.add_argument("--model", required=True, help="e.g. opt-13b (see `zomem list`)")
    parser.add_argument("--optimizer", required=True, help="a registered name or module:Class")
    parser.add_argument("--workload", required=True, help="e.g. multirc or custom:batch=8,seq=512")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES), help="weights dtype (default: float16)")
    parser.add_argument("--precision", choices=list(estimate.PRECISIONS), default=None,
                        help="pure: every tensor in --dtype; mixed: float32 weights, gradients and state, forwards "
                        "under autocast to --dtype (default: mixed for first-order methods in a half dtype, else pure)")
    parser.add_argument("--hparam", type=parse_hparam, action="append", default=[], metavar="KEY=VALUE",
                        help="an optimizer hyper-parameter, as for `zomem run` (state_dtype, implementation and "
                        "block_size change the prediction)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing (first-order methods): layers recompute activations in backward")
    parser.add_argument("--tuning", choices=list(models.TUNINGS), default="full",
                        help="what is trained: every parameter (default), LoRA adapters or a prefix (one device)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs the model is spread over, or ranks on CPU (default: 1)")
    parser.add_argument("--strategy", default=None, choices=list(strategies.STRATEGIES),
                        help="how the devices share the model (default: fsdp for first-order methods and on CPU, "
                        "pipeline for forward-only methods on GPUs)")
    parser.add_argument("--device", default="cuda", choices=list(estimate.DEVICE_KINDS),
                        help="whose calibrated constants to use (default: cuda)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=main)


def compute(args: argparse.Namespace) -> Estimate:
    """The estimate the options ask for."""
    return estimate.estimate(args.model, args.optimizer, args.workload, args.dtype, gpus=args.gpus,
                             device=args.device, precision=args.precision, hparams=dict(args.hparam),
                             checkpointing=args.checkpointing, tuning=args.tuning, strategy=args.strategy)


def render(result: Estimate) -> str:
    """A table of every device's parts in GiB, and one line naming the peak."""
    parts = ("weights", "optimizer_state", "gradients", "autocast_cache", "transient", "overhead")
    rows = [[f"{result.device}:{i}", *(f"{getattr(d, p) / GIB:,.2f}" for p in parts), f"{d.total / GIB:,.2f}"]
            for i, d in enumerate(result.devices)]
    table = tabulate(rows, headers=["device", *parts, "total"], tablefmt="github", disable_numparse=True)
    state = "calibrated" if result.calibrated else "UNCALIBRATED (analytic defaults)"
    notes = [f"{result.model} {result.optimizer} {result.workload} {result.dtype} ({result.precision} precision), "
             f"{result.gpus} {result.device} device(s), {result.placement}"
             + ("" if result.tuning == "full" else f", {result.tuning} tuning") + f"; {state} constants; GiB",
             table]
    worst = result.worst
    if worst.logits and worst.transient > 0:
        notes.append(f"of the transient, the logits: {worst.logits / GIB:,.2f} GiB "
                     f"({worst.logits / worst.transient:.0%}; the rest is the activations and the loss's copies)")
    notes += [f"predicted peak per device ({probe}): {peak / GIB:,.2f} GiB ({peak:,} bytes)"
              for probe, peak in result.peaks.items()]
    if result.offloaded:
        notes.append(f"accelerate could not place {len(result.offloaded)} modules on the GPUs: the model does not fit")
    return "\n\n".join(notes)


def main(args: argparse.Namespace) -> int:
    """Print the estimate as a table or JSON."""
    result = compute(args)
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return 0
