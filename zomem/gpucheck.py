"""The prepared GPU check: the measurements only a GPU can make, in one short run that writes as it goes.

Each step is a ``zomem`` or ``pytest`` command in its own process, bounded by what is left of the run's time, its
output appended to the log; a step that fails or runs out of time is logged and the next one runs. A killed run
keeps every record written so far. The run works from a source tree on ``PYTHONPATH`` with the interpreter at
hand (no virtual environment, no install), as on an air-gapped cluster node, and packs its folder into one
archive beside the log at the end.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from zomem import estimate, records
from zomem.hardware import MIB
from zomem.records import Record

#: the optimizers whose cells a check measures, and those its suites benchmark
OPTIMIZERS = ("inference", "mezo", "hizoo", "adamezo", "adam")
SUITE_OPTIMIZERS = "mezo,adam"


@dataclass(frozen=True)
class Plan:
    """What a check runs on one device kind: a GPU's real sizes, or CPU stand-ins small enough for a dry run."""

    device: str
    model: str
    fit_ladder: tuple[str, ...]
    #: ``fit --measure`` limit: an emulated card on a GPU, a memory budget on CPU
    fit_limit: tuple[str, ...]
    #: seconds the whole run may take
    budget_s: float
    #: elements of the tensor ``zomem blocks`` walks: large enough on a GPU that a 2^24 block is not the whole tensor
    walk_elements: int

    @classmethod
    def for_device(cls, device: str) -> Plan:
        """opt-1.3b and a 10 GiB emulated card on a GPU (5 minutes); opt-tiny and a CPU budget otherwise (3)."""
        if device.startswith("cuda"):
            return cls(device, "opt-1.3b", ("opt-1.3b", "opt-2.7b", "opt-6.7b"), ("--hardware", "1xcheck:10"), 300,
                       1 << 27)
        return cls(device, "opt-tiny", ("opt-tiny", "opt-mini", "opt-small"), ("--budget", "2GiB"), 180, 1 << 22)


@dataclass(frozen=True)
class Step:
    """One command of the check, with the share of the run's time it may take at most."""

    name: str
    argv: list[str]
    limit_s: float
    #: exit statuses that report a measurement rather than a failure (overhead's 1: the step is over its budget)
    finished: tuple[int, ...] = (0,)


def steps(plan: Plan, out: Path) -> list[Step]:
    """The check's commands in order of value: the cells first, the benchmarks and GPU tests last."""
    zomem = [sys.executable, "-m", "zomem"]
    cells = ["--models", plan.model, "--device", plan.device, "--hardware", "1xA100-80GB", "--resume"]
    reports = out / "reports"
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin_option()]
    return [
        Step("cells sst2 float32", [*zomem, "report", *cells, "--optimizers", *OPTIMIZERS, "--workloads", "sst2",
                                    "--out", str(reports / "sst2-float32")], 90),
        Step("cells multirc float16", [*zomem, "report", *cells, "--optimizers", *OPTIMIZERS[:-1], "--workloads",
                                       "multirc", "--dtype", "float16", "--out", str(reports / "multirc-float16")], 70),
        Step("cells multirc mixed float16", [*zomem, "report", *cells, "--optimizers", "adam", "--workloads",
                                             "multirc", "--dtype", "float16", "--precision", "mixed",
                                             "--out", str(reports / "multirc-mixed-float16")], 30),
        Step("overhead", [*zomem, "overhead", "--model", plan.model, "--device", plan.device, "--rounds", "3"], 40,
             (0, 1)),
        Step("blocks", [*zomem, "blocks", "--device", plan.device, "--elements", str(plan.walk_elements)], 20),
        Step("fit", [*zomem, "fit", "--measure", *plan.fit_limit, "--optimizer", "mezo", "--workload", "multirc",
                     "--dtype", "float16", "--device", plan.device, "--models", *plan.fit_ladder,
                     "--records", str(out / "fit" / "records.jsonl"), "--out", str(out / "fit" / "fits.jsonl"),
                     "--json"], 50),
        # one FSDP rank: the process group (NCCL on a GPU), sharding and per-rank peaks, on the one GPU a check has
        Step("ranks fsdp", [*zomem, "report", *cells, "--optimizers", "mezo", "adam", "--workloads", "sst2",
                            "--ranks", "1", "--strategy", "fsdp", "--out", str(reports / "sst2-fsdp-rank")], 40),
        Step("suites", [*pytest, "suites/", "--zomem-model", plan.model, "--zomem-device", plan.device,
                        "--zomem-optimizers", SUITE_OPTIMIZERS, "--zomem-workloads", "sst2", "--zomem-rounds", "3",
                        "--benchmark-json", str(out / "suites.json")], 60),
        Step("gpu tests", [*pytest, "tests/", "-m", "gpu", "-rA"], 60),
    ]


def plugin_option() -> list[str]:
    """``-p`` for zomem's pytest plugin where the package is not installed (a source tree on PYTHONPATH)."""
    installed = any(ep.name == "zomem" for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "zomem.pytest.plugin"]


def run_step(step: Step, log: Path, deadline: float) -> str:
    """Run ``step`` within its limit and what is left before ``deadline``; returns how it ended."""
    left = min(step.limit_s, deadline - time.monotonic())
    if left < 5:
        return "skipped: out of time"
    started = time.monotonic()
    with log.open("a", encoding="utf-8") as f:
        f.write(f"\n=== {step.name}: {' '.join(step.argv[1:])}\n")
        f.flush()
        try:
            code = subprocess.run(step.argv, stdout=f, stderr=subprocess.STDOUT, timeout=left).returncode
        except subprocess.TimeoutExpired:
            return f"stopped after {left:.0f} s"
    return f"exit {code} in {time.monotonic() - started:.0f} s"


def measured(out: Path) -> list[Record]:
    """Every record the check wrote, cells and fit trials."""
    return [r for path in sorted(out.rglob("records.jsonl")) for r in records.read(path)]


def comparison(found: Sequence[Record], candidate: estimate.Calibration | None) -> str:
    """Each measured cell beside the estimator's predictions: with the shipped constants, and with the candidate
    calibration fitted to these very records."""
    from zomem import calibrate

    rows = []
    for r in found:
        if r.status != "ok" or r.tuning != "full":
            rows.append([r.model, r.optimizer, r.workload, _dtype(r), r.status, "", "", "", "", ""])
            continue
        kind = r.device.split(":")[0]
        shipped = calibrate.predict(r, estimate.Calibration.load(kind)).peaks
        fitted = calibrate.predict(r, candidate).peaks if candidate and candidate.device == kind else {}
        for probe in dict.fromkeys([*shipped, *r.peak_bytes]):
            rows.append([r.model, r.optimizer, r.workload, _dtype(r), probe, _mib(r.peak_bytes.get(probe)),
                         _mib(shipped.get(probe)), _rel(shipped.get(probe), r.peak_bytes.get(probe)),
                         _mib(fitted.get(probe)), _rel(fitted.get(probe), r.peak_bytes.get(probe))])
    headers = ["model", "optimizer", "workload", "dtype", "probe", "measured MiB", "predicted (shipped)",
               "residual", "predicted (candidate)", "residual"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _dtype(r: Record) -> str:
    return r.dtype if r.precision == "pure" else f"{r.dtype} mixed"


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / MIB:,.0f}"


def _rel(predicted: int | None, measured_bytes: int | None) -> str:
    if predicted is None or not measured_bytes:
        return ""
    return f"{100 * (predicted - measured_bytes) / measured_bytes:+.1f}%"


def gpu_name(found: Sequence[Record], device: str) -> str:
    """A name for the archive: the GPU's, as the records say (``cpu`` for a dry run)."""
    names = [r.env.get("gpu") for r in found if r.env.get("gpu")]
    name = names[0] if names and device.startswith("cuda") else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name.replace("NVIDIA ", "")).strip("-").lower()


def run(device: str, out: Path, pack: Path | None) -> int:
    """The whole check: every step, then the candidate calibration, the comparison page and the archive."""
    plan = Plan.for_device(device)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu-check.log"
    deadline = time.monotonic() + plan.budget_s
    outcomes, failed = {}, []
    for step in steps(plan, out):
        outcomes[step.name] = run_step(step, log, deadline)
        print(f"{step.name}: {outcomes[step.name]}", flush=True)
        if not any(outcomes[step.name].startswith(f"exit {code} ") for code in step.finished):
            failed.append(step.name)
    found = measured(out)
    candidate = None
    kind = estimate.device_kind(device)
    try:
        from zomem import calibrate

        candidate = calibrate.fit([r for r in found if r.status == "ok"], kind, source="gpu check")
        candidate.save(out / f"{kind}.json")
    except Exception as exc:  # noqa: BLE001 - a check reports what it could not do and goes on
        outcomes["calibrate"] = f"not fitted: {exc}"
        failed.append("calibrate")
    page = [f"# GPU check on {device}: {plan.model}", "",
            tabulate(sorted(outcomes.items()), headers=["step", "outcome"], tablefmt="github"), "",
            f"{len(found)} records; the candidate calibration is `{kind}.json`" + (
                f" (worst residual {100 * candidate.worst_residual:.1f}% over {candidate.cells} cells)."
                if candidate and candidate.worst_residual is not None else " (not fitted)."),
            "", comparison(found, candidate), ""]
    (out / "comparison.md").write_text("\n".join(page), encoding="utf-8")
    (out / "outcomes.json").write_text(json.dumps(outcomes, indent=2) + "\n", encoding="utf-8")
    print(f"comparison: {out / 'comparison.md'}")
    if pack is not None:
        pack.mkdir(parents=True, exist_ok=True)
        archive = pack / f"gpu-check-{gpu_name(found, device)}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(out, arcname=archive.name.removesuffix(".tar.gz"))
        (pack / "gpu-check.log").write_bytes(log.read_bytes())
        print(f"packed: {archive} and {pack / 'gpu-check.log'}")
    return 1 if failed else 0
