"""``zomem report``: run (or reuse) a sweep of cells and write the report folder: tables, figures, index."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from zomem import calibrate, fit, hardware, models, optim, records, report, sweep, tables
from zomem.cell import Cell, resolve_device
from zomem.cli.options import add_cell_options
from zomem.estimate import Calibration
from zomem.models import DTYPES
from zomem.records import method_label

DEFAULT_MODELS = ["opt-125m"]
DEFAULT_WORKLOADS = ["sst2", "copa", "squad"]
DEFAULT_OUT = Path("out/report")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem report``."""
    parser = sub.add_parser("report", help="measure a sweep of cells and write tables, figures and an index",
                            description="Measure (or reuse) every cell of models x optimizers x workloads, then "
                            "write peak-memory, step-time and largest-fit tables, figures and index.md.")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="default: opt-125m")
    parser.add_argument("--optimizers", nargs="+", default=None, help="default: every registered optimizer")
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS, help="default: sst2 copa squad")
    parser.add_argument("--hardware", nargs="+", default=list(hardware.DEFAULT_ROWS), metavar="NxTYPE",
                        help="largest-fit rows (default: 1/2/4/8 x A100-80GB and V100-32GB)")
    parser.add_argument("--family", default="opt", choices=[f for f in models.FAMILIES if f != "test"],
                        help="the family of the largest-fit table and of the memory-vs-size figure (default: opt)")
    parser.add_argument("--fit-workload", default=fit.DEFAULT_WORKLOAD, help="largest-fit workload (default: multirc)")
    parser.add_argument("--fit-dtype", default=fit.DEFAULT_DTYPE, choices=list(DTYPES),
                        help="largest-fit weights dtype (default: float16; first-order methods in mixed precision)")
    parser.add_argument("--fit-checkpointing", nargs="+", default=[], metavar="OPTIMIZER",
                        help="first-order optimizers the largest-fit table also shows with gradient checkpointing, as "
                        "columns 'OPTIMIZER + checkpointing' (default: none)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default: {DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the records already in the folder and measure only the missing cells")
    add_cell_options(parser, steps=None, steps_help="measured steps per cell (default: 1 on CPU, 3 on a GPU)")
    parser.add_argument("--warmup-batch", type=int, default=None, metavar="N",
                        help="examples per warm-up step (default: 1 on CPU, the workload's batch on a GPU)")
    parser.add_argument("--timeline", nargs="*", default=None, metavar="OPTIMIZER",
                        help="also draw live tensor memory over one tracked step of these optimizers (none named: "
                        "every optimizer of the sweep) on the first model and workload")
    parser.set_defaults(func=main)


def settings(args: argparse.Namespace) -> sweep.Settings:
    """The sweep's settings: what was asked for, the device's defaults for the rest."""
    device = resolve_device(args.device)
    chosen = sweep.defaults(device)
    if args.steps is not None:
        chosen["steps"] = args.steps
    if args.warmup_batch is not None:
        chosen["warmup_batch"] = args.warmup_batch
    return sweep.Settings(device=device, dtype=args.dtype, precision=args.precision, tuning=args.tuning,
                          steps=chosen["steps"],
                          warmup=args.warmup, warmup_batch=chosen["warmup_batch"], hparams=dict(args.hparam),
                          timeout=args.timeout, checkpointing=args.checkpointing)


def main(args: argparse.Namespace) -> int:
    """Validate everything first and take the folder, then measure what is missing and write the folder."""
    started = time.monotonic()
    chosen = settings(args)
    optimizers = args.optimizers or optim.OPTIMIZERS.names()
    rows = [hardware.parse_row(text) for text in args.hardware]
    cells = sweep.plan(args.models, optimizers, args.workloads, chosen)
    tracked = [] if args.timeline is None else sweep.plan(args.models[:1], args.timeline or optimizers,
                                                          args.workloads[:1], chosen)
    # Held until the folder is written: a second sweep into it would measure the same cells again.
    with sweep.locked(args.out):
        return measure_and_write(args, chosen, optimizers, rows, cells, started, tracked)


def measure_and_write(args: argparse.Namespace, chosen: sweep.Settings, optimizers: list[str],
                      rows: list[hardware.HardwareRow], cells: list[Cell], started: float,
                      tracked: list[Cell] | None = None) -> int:
    """Measure the cells missing from the folder's records (and the ``tracked`` cells' timelines), then write its
    tables, figures and index."""
    records_path = args.out / "records.jsonl"
    before = len(records.read(records_path)) if records_path.exists() else 0
    measured = sweep.run(cells, records_path, resume=args.resume, timeout=chosen.timeout)
    measured_now = len(records.read(records_path)) - before

    fits = fit.read(args.out / "fits.jsonl", args.fit_workload, args.fit_dtype)
    known = {(f.hardware, f.method) for f in fits}
    columns = [(o, False) for o in optimizers] + [(o, True) for o in args.fit_checkpointing]
    todo = [(row, o, ck) for row in rows for o, ck in columns if (row.name, method_label(o, ck)) not in known]
    ladder = models.ladder(args.family)
    fits += [fit.predict(row, o, args.fit_workload, args.fit_dtype, ladder=ladder, checkpointing=ck)
             for row, o, ck in tqdm(todo, desc="largest fit", unit="fit", disable=not todo)]

    # matplotlib costs half a second at import: only this command draws, so only it pays
    from zomem import figures

    calibration = Calibration.load(chosen.device)
    gpus = list(dict.fromkeys(row.gpu for row in rows))
    written = figures.save(figures.memory_vs_size(measured, calibration, gpus, ladder), args.out, "memory_vs_size")
    written += figures.save(figures.step_breakdown(measured), args.out, "step_breakdown")
    sections: list[report.Section] = []
    if tracked:
        from zomem import timeline_report

        found, failed = sweep.run_timelines(tracked, args.out / f"{timeline_report.NAME}.json", resume=args.resume,
                                            timeout=chosen.timeout)
        for record in failed:
            print(f"zomem report: no timeline for {record.optimizer}: {record.status}: {record.error_line}",
                  file=sys.stderr)
        if found:
            paths, table = timeline_report.write(args.out, found)
            written += paths
            sections.append(timeline_report.section(found, table))
    written += report.write(args.out, measured, fits, [row.name for row in rows],
                            [method_label(o, ck) for o, ck in columns],
                            calibrate.residuals(measured, calibration), calibration, chosen,
                            elapsed_s=time.monotonic() - started, measured_now=measured_now, sections=sections,
                            family=args.family)
    print(tables.peak_memory(measured).markdown())
    print(f"report: {args.out / 'index.md'} ({len(written) + 1} files with records.jsonl)")
    return 0
