"""``zomem fit``: the largest OPT each optimizer can fine-tune on given hardware, predicted or measured."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from tabulate import tabulate

from zomem import fit, hardware, models, records, strategies, sweep
from zomem.cell import resolve_device
from zomem.cli.options import positive_int
from zomem.errors import UsageError
from zomem.fit import Fit
from zomem.harness import run_cell
from zomem.hardware import GIB
from zomem.models import DTYPES

DEFAULT_RECORDS = Path("out/fit/records.jsonl")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem fit``."""
    parser = sub.add_parser("fit", help="find the largest model of a family that fits given GPUs (or a CPU budget)",
                            description="Predict (default) or measure the largest ladder model whose step fits.")
    parser.add_argument("--hardware", nargs="+", default=None, metavar="NxTYPE",
                        help="GPU rows such as 1xA100-80GB, 8xV100-32GB or 2xMYCARD:48 (default: 1/2/4/8 x "
                        "A100-80GB and V100-32GB; with --measure, those of them this GPU can emulate)")
    parser.add_argument("--optimizer", nargs="+", required=True, help="one or more optimizers")
    parser.add_argument("--workload", default=fit.DEFAULT_WORKLOAD, help="default: multirc")
    parser.add_argument("--dtype", default=fit.DEFAULT_DTYPE, choices=list(DTYPES),
                        help="weights dtype (default: float16; first-order methods then in mixed precision)")
    parser.add_argument("--precision", choices=["pure", "mixed"], default=None,
                        help="what the cells run: pure (every tensor in --dtype) or mixed (float32 weights, autocast "
                        "to --dtype); default: mixed for first-order methods in a half dtype, else pure")
    parser.add_argument("--checkpointing", action="store_true",
                        help="with gradient checkpointing (first-order methods): the largest-fit table's "
                        "'OPTIMIZER + checkpointing' variant")
    parser.add_argument("--family", default="opt", help="the family whose models are the ladder to search: "
                        f"{', '.join(f for f in models.FAMILIES if f != 'test')} (default: opt)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="the ladder to search, smallest first: any models, config.json paths too (instead of "
                        "--family)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--predict", action="store_const", dest="mode", const="predict",
                      help="ask the estimator (default)")
    mode.add_argument("--measure", action="store_const", dest="mode", const="measure",
                      help="run cells: on a GPU under a memory cap emulating each card, on CPU against --budget")
    parser.add_argument("--budget", type=hardware.parse_bytes, default=None,
                        help="CPU memory budget for --measure, e.g. 2GiB (the peak of the whole process)")
    parser.add_argument("--device", default="auto", help="device for --measure: auto, cpu, cuda or cuda:N")
    parser.add_argument("--ranks", type=positive_int, default=1, metavar="N",
                        help="--measure on CPU: run each trial as N ranks, each held to --budget (on GPUs a row's "
                        "count of cards sets the ranks)")
    parser.add_argument("--strategy", default=None, choices=list(strategies.STRATEGIES),
                        help="how a trial's ranks share the model (default: fsdp)")
    parser.add_argument("--records", type=Path, default=DEFAULT_RECORDS,
                        help=f"where --measure appends the records of its trials (default: {DEFAULT_RECORDS})")
    parser.add_argument("--out", type=Path, default=None,
                        help="also append each fit as a JSON line here (a report folder's fits.jsonl)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=main, mode="predict")


def compute(args: argparse.Namespace) -> list[Fit]:
    """Every (hardware row or budget) × optimizer fit the options ask for."""
    args.models = args.models or list(models.ladder(args.family))
    if args.mode == "predict":
        if args.budget is not None:
            raise UsageError("--budget is for --measure on CPU; predictions are made for --hardware rows")
        rows = [hardware.parse_row(text) for text in args.hardware or hardware.DEFAULT_ROWS]
        return [fit.predict(row, o, args.workload, args.dtype, ladder=args.models, precision=args.precision,
                            checkpointing=args.checkpointing)
                for row in rows for o in args.optimizer]
    device = resolve_device(args.device)
    steps = {k: v for k, v in sweep.defaults(device).items() if k != "steps"}
    # Everything is checked before the first cell runs: a bad row or optimizer must not cost an hour of trials.
    templates = [fit.template(args.models[0], o, args.workload, args.dtype, args.precision, device,
                              checkpointing=args.checkpointing, ranks=args.ranks, strategy=args.strategy, **steps)
                 for o in args.optimizer]
    records.check_appendable(args.records, "--records")
    if args.out is not None:
        records.check_appendable(args.out)
    run = functools.partial(run_cell, out=args.records)
    if device == "cpu":
        if args.budget is None:
            raise UsageError("--measure on CPU needs a memory budget, e.g. --budget 2GiB")
        label = f"cpu budget {args.budget / GIB:.3g} GiB" + (f" x{args.ranks} ranks" if args.ranks > 1 else "")
        return [fit.measure(t, args.budget, label, run, ladder=args.models,
                            guess=fit.guess(args.budget, t, args.models))
                for t in templates]
    if args.budget is not None:
        raise UsageError("--budget is for CPU; on a GPU each --hardware card is emulated with a memory cap")
    total, gpus = fit.gpu_total_bytes(device), torch.cuda.device_count()  # through NVML where it can
    rows = [hardware.parse_row(text) for text in args.hardware] if args.hardware else emulable(total, gpus)
    cells = [(row, fit.gpu_cell(row, t, total, gpus)) for t in templates for row in rows]
    return [fit.measure(cell, row.gpu.memory_bytes, row.name, run, ladder=args.models,
                        guess=fit.predict(row, cell.optimizer, args.workload, args.dtype, ladder=args.models,
                                          precision=cell.precision, checkpointing=cell.checkpointing,
                                          strategy=cell.strategy).answer)
            for row, cell in cells]


def emulable(total_bytes: int | None, gpus: int = 1) -> list[hardware.HardwareRow]:
    """The default rows ``gpus`` GPUs of ``total_bytes`` can emulate: up to that many cards no larger than one."""
    if total_bytes is None:
        raise UsageError("NVML cannot read this GPU's memory (a MIG slice, or a container without NVML), so which "
                         "default rows it can emulate is unknown; name them with --hardware, e.g. 1xV100-16GB")
    rows = [hardware.parse_row(text) for text in hardware.DEFAULT_ROWS]
    found = [row for row in rows if row.count <= gpus and row.gpu.memory_bytes <= total_bytes]
    if not found:
        raise UsageError(f"this GPU ({total_bytes / GIB:.1f} GiB) can emulate none of the default rows; name one "
                         "with --hardware, e.g. 1xV100-16GB or 1xMYCARD:24")
    return found


def _peak(trial: fit.Trial) -> str:
    if trial.peak_bytes is None:
        return str(trial.detail.get("status", ""))
    offloaded = f" ({trial.detail['offloaded']} modules offloaded)" if trial.detail.get("offloaded") else ""
    return f"{trial.peak_bytes / GIB:,.2f} GiB{offloaded}"


def render(results: list[Fit]) -> str:
    """One line per fit: the answer and every model tried with its peak."""
    rows = []
    for f in results:
        tried = ", ".join(f"{t.model} {'fits' if t.fits else 'no'} " + _peak(t) for t in f.trials)
        rows.append([f.hardware, f.method, f.answer or "none", f.source, tried])
    return tabulate(rows, headers=["hardware", "optimizer", "largest fit", "source", "models tried (peak per GPU)"],
                    tablefmt="github", disable_numparse=True)


def main(args: argparse.Namespace) -> int:
    """Print the fits; append them to --out when given."""
    results = compute(args)
    if args.out is not None:
        for result in results:
            fit.append(args.out, result)
    print(json.dumps([f.as_dict() for f in results], indent=2) if args.json else render(results))
    return 0
