"""``zomem report``: run (or reuse) a sweep of cells and write the report folder: tables, figures, index.

The sweep can run a cell per GPU at a time (--jobs), be cut into shards for several machines (--shard), have its
shards merged into one report (--merge), or be submitted as shard jobs to Slurm (--executor); see docs/cluster.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zomem import calibrate, cluster, fit, hardware, models, optim, records, report, strategies, sweep, tables
from zomem.cell import Cell, check_device_name, resolve_device
from zomem.cli.options import add_cell_options, positive_int, whole_number
from zomem.errors import UsageError
from zomem.estimate import Calibration
from zomem.models import DTYPES
from zomem.records import Record, method_label

DEFAULT_MODELS = ["opt-125m"]
DEFAULT_WORKLOADS = ["sst2", "copa", "squad"]
DEFAULT_OUT = Path("out/report")
#: minutes a shard job may run when --time-limit is not given
DEFAULT_TIME_LIMIT = 60


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
    add_spreading_options(parser)
    parser.set_defaults(func=main)


def add_spreading_options(parser: argparse.ArgumentParser) -> None:
    """The options that spread a sweep over the GPUs of a box, over machines, and over Slurm jobs."""
    group = parser.add_argument_group("spreading a sweep (docs/cluster.md)")
    group.add_argument("--jobs", type=cluster.parse_jobs, default=1, metavar="N|auto",
                       help="cells measured at a time, each child pinned to GPUs of its own through "
                       "CUDA_VISIBLE_DEVICES, a cell of R ranks to R of them (auto: one per visible GPU, 1 on CPU; "
                       "default: 1)")
    group.add_argument("--allow-shared-cpu", action="store_true",
                       help="let --jobs run several cells at once on a CPU, where they slow each other down (the "
                       "index page then says so)")
    group.add_argument("--shard", type=cluster.parse_shard, default=None, metavar="K/N",
                       help="measure shard K of N: the cells whose place in the plan (each model, each workload, "
                       "each optimizer, in the order given) is K-1 modulo N")
    group.add_argument("--merge", nargs="+", type=Path, default=None, metavar="DIR",
                       help="measure nothing: merge these report folders (the shards) into --out and write its report")
    group.add_argument("--executor", choices=cluster.EXECUTORS, default=None,
                       help="submit --shards shard jobs through submitit (slurm: an array job; local: processes of "
                       "this machine, one at a time), then merge their folders into --out")
    group.add_argument("--shards", type=positive_int, default=None, metavar="N", help="--executor: shard jobs")
    group.add_argument("--partition", default=None, help="--executor slurm: the partition (default: Slurm's)")
    group.add_argument("--gpus-per-task", type=whole_number, default=None, metavar="N",
                       help="--executor: GPUs each shard job gets (default: 0, the shards run on CPU)")
    group.add_argument("--time-limit", type=positive_int, default=None, metavar="MINUTES",
                       help=f"--executor: minutes each shard job may run (default: {DEFAULT_TIME_LIMIT})")


def check_spreading(args: argparse.Namespace) -> None:
    """Refuse spreading options that do not go together, before anything is planned."""
    if args.timeline is not None and (args.shard or args.merge or args.executor):
        raise UsageError("--timeline tracks its steps in an unsharded report: run it without --shard, --merge or "
                         "--executor")
    if args.merge is not None and (args.shard or args.executor):
        raise UsageError(f"--merge measures nothing, so it takes no {'--shard' if args.shard else '--executor'}")
    job_options = {"--shards": args.shards, "--partition": args.partition, "--gpus-per-task": args.gpus_per_task,
                   "--time-limit": args.time_limit}
    if args.executor is None:
        given = [flag for flag, value in job_options.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} is an option of --executor (the shard jobs it submits)")
    elif args.shards is None:
        raise UsageError("--executor needs --shards N: how many shard jobs to submit")
    elif args.shard is not None:
        raise UsageError("--executor submits every shard itself: leave out --shard")


def settings(args: argparse.Namespace, device: str | None = None) -> sweep.Settings:
    """The sweep's settings: what was asked for, the device's defaults for the rest (``device``: where the cells will
    run, when that is not this machine; default: --device resolved here)."""
    device = device or resolve_device(args.device)
    chosen = sweep.defaults(device)
    if args.steps is not None:
        chosen["steps"] = args.steps
    if args.warmup_batch is not None:
        chosen["warmup_batch"] = args.warmup_batch
    return sweep.Settings(device=device, dtype=args.dtype, precision=args.precision, tuning=args.tuning,
                          steps=chosen["steps"],
                          warmup=args.warmup, warmup_batch=chosen["warmup_batch"], hparams=dict(args.hparam),
                          timeout=args.timeout, checkpointing=args.checkpointing, ranks=args.ranks,
                          strategy=strategies.resolve(args.strategy, args.ranks))


def main(args: argparse.Namespace) -> int:
    """Validate everything first and take the folder, then measure what is missing (or merge folders, or submit
    shard jobs) and write the folder."""
    started = time.monotonic()
    check_spreading(args)
    if args.merge is not None:
        with sweep.locked(args.out):
            return merge_and_write(args, args.merge, started)
    if args.executor is not None:
        return submit(args, started)
    planned = plan(args)
    # Held until the folder is written: a second sweep into it would measure the same cells again.
    with sweep.locked(args.out):
        return measure_and_write(args, planned, started)


@dataclass
class Planned:
    """A report's sweep, checked: its settings, its cells (with --shard, this shard's) and how many run at once."""

    settings: sweep.Settings
    optimizers: list[str]
    rows: list[hardware.HardwareRow]
    cells: list[Cell]
    #: the cells whose memory timelines are tracked
    tracked: list[Cell]
    jobs: int
    #: the GPUs cells are pinned to when several run at once
    gpus: list[str]


def plan(args: argparse.Namespace) -> Planned:
    """The sweep ``args`` ask for, every name, shape and option checked before anything runs."""
    chosen = settings(args)
    gpus = sweep.visible_gpus() if chosen.device.startswith("cuda") else []
    jobs = cluster.jobs_at_once(args.jobs, chosen.device, gpus, args.allow_shared_cpu)
    optimizers = args.optimizers or optim.OPTIMIZERS.names()
    rows = [hardware.parse_row(text) for text in args.hardware]
    cells = sweep.plan(args.models, optimizers, args.workloads, chosen)
    if args.shard is not None:
        cells = cluster.shard(cells, *args.shard)
    tracked = [] if args.timeline is None else sweep.plan(args.models[:1], args.timeline or optimizers,
                                                          args.workloads[:1], chosen)
    return Planned(chosen, optimizers, rows, cells, tracked, jobs, gpus)


def measure(args: argparse.Namespace, planned: Planned,
            launch: sweep.Launch | None = None) -> tuple[list[Record], int]:
    """Measure the planned cells missing from the folder's records, each through ``launch`` (default: the harness's):
    every planned cell's record, and how many were measured now."""
    records_path = args.out / "records.jsonl"
    before = len(records.read(records_path)) if records_path.exists() else 0
    measured = sweep.run(planned.cells, records_path, resume=args.resume, timeout=planned.settings.timeout,
                         jobs=planned.jobs, gpus=planned.gpus, launch=launch)
    return measured, len(records.read(records_path)) - before


def measure_and_write(args: argparse.Namespace, planned: Planned, started: float) -> int:
    """Measure the cells missing from the folder's records (and the tracked cells' timelines), then write its tables,
    figures and index."""
    from zomem import timeline_report

    # a tracked cell's step is tracked by the child that measures it, or after the sweep when it was measured before
    tracking = sweep.Tracking(planned.tracked, args.out / f"{timeline_report.NAME}.json", resume=args.resume)
    measured, measured_now = measure(args, planned, tracking.launch())
    sections = [] if args.shard is None else [report.shard_section(*args.shard)]
    written: list[Path] = []
    if planned.tracked:
        found, failed = tracking.finish(planned.settings.timeout)
        for record in failed:
            print(f"zomem report: no timeline for {record.optimizer}: {record.status}: {record.error_line}",
                  file=sys.stderr)
        if found:
            paths, table = timeline_report.write(args.out, found)
            written += paths
            sections.append(timeline_report.section(found, table))
    return write(args, planned.settings, planned.optimizers, planned.rows, measured, started, measured_now, sections,
                 written)


def merge_and_write(args: argparse.Namespace, folders: list[Path], started: float) -> int:
    """Merge the report folders ``folders`` (and, when resuming, what ``--out`` holds) into ``--out`` and write its
    report, measuring nothing; the cells' settings come from the records. The caller holds ``--out``."""
    rows = [hardware.parse_row(text) for text in args.hardware]
    # What --out holds is merged too when resuming; without --resume, a folder holding records is refused.
    sources = [args.out, *folders] if sweep.existing(args.out / "records.jsonl", args.resume) else list(folders)
    merged = cluster.merge(sources)
    chosen = cluster.settings_of(merged.records, dict(args.hparam))
    cluster.write_merged(args.out, merged)
    optimizers = list(dict.fromkeys(r.optimizer for r in merged.records))
    return write(args, chosen, optimizers, rows, merged.records, started, 0, [report.merged_section(merged.sources)])


def submit(args: argparse.Namespace, started: float) -> int:
    """Check the sweep here, submit its shards as jobs that each write a folder under ``--out``, wait for them, and
    merge their folders into ``--out``."""
    # absolute: the jobs may start elsewhere
    args = argparse.Namespace(**{**vars(args), "out": args.out.resolve()})
    out, gpus = args.out, args.gpus_per_task or 0
    check_device_name(args.device)  # not resolved: this machine (a login node) need not have the jobs' GPUs
    if args.device.startswith("cuda") and not gpus:
        raise UsageError(f"--device {args.device}, but the shard jobs get no GPU: add --gpus-per-task N")
    device = "cpu" if args.device == "cpu" or not gpus else "cuda" if args.device == "auto" else args.device
    chosen = settings(args, device=device)
    cluster.jobs_at_once(args.jobs, device, [str(i) for i in range(gpus)], args.allow_shared_cpu)
    rows = [hardware.parse_row(text) for text in args.hardware]
    # Names, shapes and hyper-parameters are checked here, on CPU: this machine (a login node) may have no GPU; each
    # shard checks its own device on its node.
    cells = sweep.plan(args.models, args.optimizers or optim.OPTIMIZERS.names(), args.workloads,
                       dataclasses.replace(chosen, device="cpu"))
    if args.shards > len(cells):
        raise UsageError(f"--shards {args.shards} for a sweep of {len(cells)} cells: use at most {len(cells)}")
    folders = [out / cluster.SHARDS_DIR / str(k) for k in range(1, args.shards + 1)]
    with sweep.locked(out):
        for folder in [out, *folders]:
            sweep.existing(folder / "records.jsonl", args.resume)
        executor = cluster.executor(args.executor, out / cluster.JOBS_DIR, shards=args.shards,
                                    partition=args.partition, gpus_per_task=gpus,
                                    minutes=args.time_limit or DEFAULT_TIME_LIMIT)
        (out / cluster.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        # On one machine the shards measure in turn: side by side they would slow each other down.
        lock = out / cluster.SHARDS_DIR / cluster.MACHINE_LOCK if args.executor == "local" else None
        shards = [argparse.Namespace(**{**vars(args), "out": folder, "shard": (k, args.shards), "resume": True,
                                        "executor": None, "shards": None, "partition": None, "gpus_per_task": None,
                                        "time_limit": None})
                  for k, folder in enumerate(folders, start=1)]
        jobs = executor.map_array(shard_job, shards, [lock] * len(shards))
        print(f"zomem report: submitted {len(jobs)} shard jobs ({', '.join(job.job_id for job in jobs)}); their logs: "
              f"{out / cluster.JOBS_DIR}", file=sys.stderr)
        try:
            failed = cluster.failures(jobs)
        except KeyboardInterrupt:
            if args.executor == "slurm":
                print(f"zomem report: Slurm keeps the shard jobs running (scancel stops them); once they finish, "
                      f"merge their folders: zomem report --merge {' '.join(map(str, folders))} --out {out}",
                      file=sys.stderr)
            raise
        for line in failed:
            print(f"zomem report: {line}", file=sys.stderr)
        if failed:
            print("zomem report: the records the shards wrote are kept; run the same command with --resume to measure "
                  "only what is missing", file=sys.stderr)
            return 1
        return merge_and_write(args, folders, started)


def shard_job(args: argparse.Namespace, lock: Path | None) -> None:
    """One shard of an ``--executor`` sweep, run as a submitit job: measure the cells of ``--shard K/N`` into its
    folder once ``lock`` (None: no waiting) is this job's. Its records are all the merge needs, so it writes no
    tables. A failure raises, and so fails the job."""
    planned = plan(args)
    with cluster.one_at_a_time(lock), sweep.locked(args.out):
        measure(args, planned)


def write(args: argparse.Namespace, chosen: sweep.Settings, optimizers: list[str], rows: list[hardware.HardwareRow],
          measured: list[Record], started: float, measured_now: int, sections: list[report.Section],
          written: list[Path] | None = None) -> int:
    """Write the folder's largest-fit table (reusing its measured fits), figures, tables and index from ``measured``;
    ``written``: files already written into it."""
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
    written = list(written or [])
    written += figures.save(figures.memory_vs_size(measured, calibration, gpus, ladder), args.out, "memory_vs_size")
    written += figures.save(figures.step_breakdown(measured), args.out, "step_breakdown")
    written += report.write(args.out, measured, fits, [row.name for row in rows],
                            [method_label(o, ck) for o, ck in columns],
                            calibrate.residuals(measured, calibration), calibration, chosen,
                            elapsed_s=time.monotonic() - started, measured_now=measured_now, sections=sections,
                            family=args.family)
    print(tables.peak_memory(measured).markdown())
    print(f"report: {args.out / 'index.md'} ({len(written) + 1} files with records.jsonl)")
    return 0
