"""The report folder: its tables (:mod:`zomem.tables`), figures and the index page that says where every number
comes from."""

from __future__ import annotations

import collections
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from zomem import estimate, workloads
from zomem.calibrate import Residual
from zomem.fit import Fit
from zomem.probes import NVML_INTERVAL_S
from zomem.records import Record
from zomem.sweep import Settings
from zomem.tables import (BASELINE, Table, largest_fit, memory_breakdown, peak_memory, plural, primary_probe,
                          rank_peaks, residual_table, step_time)


@dataclass
class Section:
    """A further part of the index page (the memory timeline's, say): its lines in the list of files, and its body."""

    title: str
    files: list[str]
    body: list[str]


#: the figures a report folder holds, and what each shows
FIGURES = {
    "memory_vs_size": "peak memory against model size per optimizer and workload: measured points solid, the "
                      "estimator dashed, GPU capacities dotted",
    "step_breakdown": "median step time split into phases (forward, backward, perturb, update, other …)",
}
PROBES = {
    "cpu_hwm": "`cpu_hwm`: the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs "
               "before the measured steps), so the interpreter and libraries (the floor read before the model "
               "was built) are part of every peak",
    "torch_allocated": "`torch_allocated`: torch.cuda.max_memory_allocated over the measured steps",
    "torch_reserved": "`torch_reserved`: torch.cuda.max_memory_reserved over the measured steps",
    "nvml": "`nvml`: the driver's count of this process's GPU memory (CUDA context and allocator cache "
            f"included), sampled every {NVML_INTERVAL_S * 1000:.0f} ms and at both ends of the measured steps: what "
            "decides an out-of-memory",
}


def write(folder: Path, records: Sequence[Record], fits: Sequence[Fit], hardware: Sequence[str],
          optimizers: Sequence[str], residuals: Sequence[Residual], calibration: estimate.Calibration,
          settings: Settings, elapsed_s: float, measured_now: int, sections: Sequence[Section] = (),
          family: str = "opt") -> list[Path]:
    """Write every table (Markdown, CSV, LaTeX) and ``index.md`` (with ``sections`` after the figures) into
    ``folder``; return the paths. The largest-fit table is about ``family``'s models."""
    tables = [peak_memory(records), memory_breakdown(records), step_time(records),
              largest_fit(fits, hardware, optimizers, family), residual_table(residuals)]
    paths = [path for table in tables for path in table.write(folder)]
    if any(r.rank_peak_bytes for r in records):
        ranks = rank_peaks(records)
        paths += ranks.write(folder)
        sections = [*sections, Section(ranks.title, [_table_files(ranks)], [ranks.markdown()])]
    index_path = folder / "index.md"
    text = index(records, tables, fits, residuals, calibration, settings, elapsed_s, measured_now, sections)
    index_path.write_text(text, encoding="utf-8")
    return [*paths, index_path]


def shard_section(k: int, n: int) -> Section:
    """What the index of a shard's folder says of it."""
    return Section(title="Shard", files=[], body=[
        f"This folder holds shard {k}/{n} of a sweep: the cells whose place in the plan (each model, each workload, "
        f"each optimizer, in the order given) is {k - 1} modulo {n}. `zomem report --merge` assembles the shards' "
        "folders into one report."])


def merged_section(sources: dict[Path, int]) -> Section:
    """What the index of a merged folder says of the folders it was assembled from."""
    return Section(title="Merged folders", files=[], body=[
        f"Assembled by `zomem report --merge` from {plural(len(sources), 'folder')}, measuring nothing. A cell found "
        "in several folders is kept once (its finished records there are identical, and an `error` gives way to a "
        "finished record); the settings above are those of the records.", "",
        *(f"- `{folder}`: {plural(n, 'record')}" for folder, n in sources.items())])


def _values(records: Sequence[Record], key: str) -> str:
    found = list(dict.fromkeys(str(r.env.get(key)) for r in records if r.env.get(key) is not None))
    return ", ".join(found) if found else "none"


def _machine_name(env: dict[str, Any]) -> str:
    """A machine as a record's ``env`` describes it: its host (where recorded), its GPU, where the cell used one, and
    its CPU."""
    hardware = " with ".join(str(env[name]) for name in ("gpu", "cpu") if env.get(name))
    return f"{env['host']}: {hardware}" if env.get("host") else hardware


def _machines(records: Sequence[Record]) -> list[str]:
    found = collections.Counter(_machine_name(r.env) for r in records if r.env.get("cpu"))
    if len(found) < 2:
        return []
    return [f"These records come from {len(found)} different machines: "
            + "; ".join(f"{name} ({plural(n, 'cell')})" for name, n in found.items())
            + ". Compare their numbers with that in mind.", ""]


def _machine(records: Sequence[Record]) -> list[str]:
    measured = [r for r in records if r.env]
    rows = [["CPU", f"{_values(measured, 'cpu')} ({_values(measured, 'cpu_count')} torch threads)"],
            ["GPU", _values(measured, "gpu")]]
    if any(r.env.get("gpu") for r in measured):
        total = {r.env["gpu_total_bytes"] for r in measured if r.env.get("gpu_total_bytes")}
        rows += [["GPU memory", ", ".join(f"{t / 2**30:.1f} GiB" for t in sorted(total))],
                 ["driver", _values(measured, "driver")], ["CUDA", _values(measured, "cuda")]]
    rows += [[name, _values(measured, name)] for name in ("python", "torch", "transformers", "zomem", "git_commit")]
    return [*_machines(measured), tabulate(rows, headers=["", ""], tablefmt="github", disable_numparse=True)]


def _settings(records: Sequence[Record], settings: Settings) -> list[str]:
    warm = plural(settings.warmup, "warm-up step")
    if settings.warmup_batch:
        warm += f" on the first {plural(settings.warmup_batch, 'example')} of the batch"
    lines = [
        f"- Device `{settings.device}`, dtype `{settings.dtype}`, precision `{settings.precision}`"
        + (" (float32 weights, forwards under autocast)" if settings.precision == "mixed" else "")
        + f", tuning `{settings.tuning}`; optimizer "
        "hyper-parameters: " + (", ".join(f"`{k}={v}`" for k, v in settings.hparams.items()) or "each optimizer's "
                                "defaults") + " (every record's `hparams` lists them all).",
        f"- Each cell runs in a fresh child process: probe baseline → build the model (random weights) → build the "
        f"batch → {warm} → peaks reset → {plural(settings.steps, 'measured step')} → readings.",
    ]
    if settings.strategy is not None:
        lines.append(f"- Each cell ran as {plural(settings.ranks, 'rank')} sharing the model by `{settings.strategy}`"
                     + (", one process each, each with its share of the batch" if settings.strategy != "pipeline"
                        else ", its layers over as many GPUs in one process")
                     + ": a peak is the most any rank reached (each rank's: the table of cells of several ranks).")
    shared = collections.Counter(r.env["cells_at_once"] for r in records if r.env.get("cells_at_once", 1) > 1)
    for at_once, n in shared.items():
        lines.append(f"- **Shared CPU**: {plural(n, 'cell')} ran {at_once} at a time on this CPU (`--jobs {at_once} "
                     "--allow-shared-cpu`), each slowed by the others: their step times (and, under memory pressure, "
                     "their peaks) are not those of a machine to itself.")
    thresholds = {r.env.get("malloc_mmap_threshold") for r in records if r.env}
    if settings.device == "cpu" and thresholds - {None}:
        frozen = ", ".join(sorted(thresholds - {None}))
        lines.append(f"- Each CPU child ran with glibc's mmap threshold frozen at {frozen} "
                     "bytes (`MALLOC_MMAP_THRESHOLD_`, set by the harness): freed tensors go back to the OS instead of "
                     "lingering in the heap by amounts that vary from run to run, so the peaks are reproducible.")
    if settings.device == "cpu" and settings.steps < 2:
        lines.append(
            "- CPU default: one measured step per cell, after a warm-up step on one example. A warm-up step is "
            "what makes lazily created optimizer state (Adam's moments, HiZOO's Hessian …) exist before peaks "
            "are reset, and its batch size does not change that state, so one example suffices; the measured "
            "step runs the full batch. With one measured step a median has no IQR: `zomem report --steps 3` "
            "gives one at three times the cost (a CPU step of opt-125m takes seconds). Methods whose early steps "
            "are cheaper are timed at their steady state all the same (AdaMeZO's window full, ZO-AdaMU past T1): "
            "they reach it before the warm-up without forwards, and the step-time notes say from which step each "
            "was timed.")
    rows = []
    for name in dict.fromkeys(r.workload for r in records):
        w = workloads.get(name)
        rows.append([name, w.batch_size, w.seq_len, w.candidates, w.loss, w.provenance])
    lines += ["", tabulate(rows, headers=["workload", "batch", "seq", "candidates", "loss", "where the shape comes "
                                          "from"], tablefmt="github", disable_numparse=True)]
    return lines


def _table_files(t: Table) -> str:
    return f"- {t.title}: [{t.name}.md]({t.name}.md), [{t.name}.csv]({t.name}.csv), [{t.name}.tex]({t.name}.tex)"


def _files(tables: Sequence[Table]) -> list[str]:
    lines = [_table_files(t) for t in tables]
    lines += [f"- Figure, {text}: [{name}.png]({name}.png), [{name}.svg]({name}.svg)" for name, text in FIGURES.items()]
    lines.append("- Every measured cell, one JSON object per line: [records.jsonl](records.jsonl)")
    return lines


def _sources(records: Sequence[Record], fits: Sequence[Fit], calibration: estimate.Calibration) -> list[str]:
    probes = sorted({primary_probe(r) for r in records})
    cuda = estimate.Calibration.load("cuda")
    predicted = sum(f.source == "predicted" for f in fits)
    lines = [f"- Peak memory (table and measured points of the figure): probe {'; '.join(PROBES[p] for p in probes)}. "
             f"The ratio divides by {BASELINE}'s peak on the same workload, same probe.",
             "- Step time: wall seconds per step from the step timer (CUDA events on a GPU, the device synchronised "
             "at step boundaries); the phases figure: the phase timer's median seconds per phase, `other` being "
             "step time outside every named phase (e.g. torch's own Adam update).",
             "- Forwards/step: closure calls per measured step, counted by the harness."]
    methods = collections.Counter((probe, r.probe_methods[probe]) for r in records for probe in probes
                                  if probe in r.probe_methods)
    if methods:
        lines.append("- How the table's probe read its peaks: " + "; ".join(
            f"`{probe}` by `{method}` in {plural(n, 'cell')}" for (probe, method), n in methods.items())
            + " (each record's `probe_methods`).")
    measured_fits = len(fits) - predicted
    lines.append(f"- Largest fit: {predicted} cells predicted by the estimator with the `cuda` constants ("
                 f"{'calibrated' if cuda.calibrated else 'uncalibrated'}: {cuda.source})"
                 + (f"; {measured_fits} measured by `zomem fit --measure` (fits.jsonl)" if measured_fits else "")
                 + ". A predicted fit is the largest ladder model whose predicted peak on the most loaded GPU is "
                 "within the card's capacity; forward-only methods are placed over several GPUs by accelerate's "
                 "balanced device map (computed on the meta device), first-order ones sharded as FSDP full "
                 "sharding with one unit per decoder layer.")
    lines.append(f"- Predicted curves of the figure: the estimator with the `{calibration.device}` constants "
                 f"({'calibrated' if calibration.calibrated else 'uncalibrated'}: {calibration.source}), same "
                 "workload, dtype and tuning as the measured cells.")
    return lines


def _span(records: Sequence[Record]) -> str:
    times = sorted(datetime.datetime.fromisoformat(r.time) for r in records if r.time)
    if not times:
        return "no measurement times recorded"
    minutes = (times[-1] - times[0]).total_seconds() / 60
    return (f"measured from {times[0]:%Y-%m-%d %H:%M} to {times[-1]:%H:%M} UTC (first to last record: "
            f"{minutes:.1f} minutes)")


def index(records: Sequence[Record], tables: Sequence[Table], fits: Sequence[Fit], residuals: Sequence[Residual],
          calibration: estimate.Calibration, settings: Settings, elapsed_s: float, measured_now: int,
          sections: Sequence[Section] = ()) -> str:
    """The report's front page: machine, versions, settings, every table and figure, and where each number comes
    from."""
    peak, breakdown, step, fit_table, residual = tables
    model_names = ", ".join(dict.fromkeys(r.model for r in records))
    optimizers = list(dict.fromkeys(r.optimizer for r in records))
    workload_names = ", ".join(dict.fromkeys(r.workload for r in records))
    failed = [r for r in records if r.status != "ok"]
    worst = max(residuals, key=lambda r: abs(r.relative)) if residuals else None
    lines = [f"# zomem report: {model_names}, {len(optimizers)} optimizers, {workload_names} on {settings.device}", "",
             f"{len(records)} cells ({len(records) - len(failed)} ok"
             + (f", {len(failed)} not: {', '.join(f'{r.optimizer}/{r.workload} {r.status}' for r in failed)}"
                if failed else "") + f"), {_span(records)}; the `zomem report` run that wrote this page measured "
             f"{measured_now} of them and took {elapsed_s / 60:.1f} minutes.", ""]
    if worst is not None:
        w = worst.record
        lines += [f"**Estimator check: worst residual {100 * worst.relative:+.1f}%** ({w.model} {w.optimizer} "
                  f"{w.workload}) over {len(residuals)} measured cells; see [Estimator against measurement]"
                  "(#estimator-against-measurement).", ""]
    lines += ["## Files", "", *_files(tables), *(f for s in sections for f in s.files), "",
              "## Machine and versions", "", *_machine(records), "",
              "## Settings", "", *_settings(records, settings), "",
              f"## {peak.title}", "", peak.markdown(), f"## {breakdown.title}", "", breakdown.markdown(),
              f"## {step.title}", "", step.markdown(),
              f"## {fit_table.title}", "", fit_table.markdown(),
              "Defaults of this table: workload multirc (batch 1, about 400 tokens: the MeZO paper's memory "
              "setting); float16 weights for forward-only methods; mixed precision for first-order ones (float32 "
              "weights, gradients and moments, forwards under float16 autocast); "
              "hardware rows 1/2/4/8 × A100-80GB and "
              "1/2/4/8 × V100-32GB. A cell is measured only where `zomem fit --measure` ran on such a card "
              "(recorded in fits.jsonl); every other cell is predicted, and marked (p).", "",
              "## Figures", ""]
    lines += [f"![{text}]({name}.png)\n\n{text[0].upper()}{text[1:]}.\n" for name, text in FIGURES.items()]
    for section in sections:
        lines += [f"## {section.title}", "", *section.body, ""]
    lines += ["## Where every number comes from", "", *_sources(records, fits, calibration), "",
              "## Estimator against measurement", "",
              f"Constants: `{calibration.device}` ({'calibrated' if calibration.calibrated else 'uncalibrated'}: "
              f"{calibration.source}). Residual = (predicted − measured) / measured, largest first.", "",
              residual.markdown()]
    return "\n".join(lines) + "\n"
