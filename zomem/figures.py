"""The report's figures, drawn from records and the estimator with matplotlib (Agg: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from zomem import estimate, models  # noqa: E402
from zomem.hardware import GIB, Gpu  # noqa: E402
from zomem.records import Record  # noqa: E402

#: phases in the order a step runs them; each keeps its colour in every figure
PHASE_COLOURS = {"forward": "#4C72B0", "backward": "#C44E52", "perturb": "#55A868", "regenerate": "#8172B2",
                 "update": "#CCB974", "other": "#B0B0B0"}
MARKERS = "osD^v<>pPX*h"


#: twelve colours that stay apart (tab10 and two more), so each built-in optimizer has its own
PALETTE = [*plt.get_cmap("tab10").colors, "black", "gold"]


def _colours(names: Sequence[str]) -> dict[str, object]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _marker(k: int) -> str:
    """The k-th optimizer's marker: shifted by one each time the colours come round, so no two of the first 144
    share both colour and marker."""
    return MARKERS[(k + k // len(PALETTE)) % len(MARKERS)]


def _size_label(model: str) -> str:
    return model.removeprefix("opt-")


def memory_vs_size(records: Sequence[Record], calibration: estimate.Calibration, gpus: Sequence[Gpu],
                   ladder: Sequence[str] = tuple(spec.name for spec in models.LADDER)) -> Figure:
    """Peak memory against model size along ``ladder`` (OPT's by default), one panel per workload: measured points
    solid, the estimator dashed, GPU capacities as horizontal lines."""
    ok = [r for r in records if r.status == "ok"]
    optimizers = list(dict.fromkeys(r.optimizer for r in records))
    workload_names = list(dict.fromkeys(r.workload for r in records))
    dtype, tuning, precision = records[0].dtype, records[0].tuning, records[0].precision
    colours = _colours(optimizers)
    # the ladder, plus any measured model off it (the test configs), smallest first
    ladder = sorted({*ladder, *(r.model for r in ok)}, key=lambda m: estimate.shape(m).params)
    sizes = [estimate.shape(name).params for name in ladder]
    fig, axes = plt.subplots(1, len(workload_names), figsize=(5.2 * len(workload_names) + 2.6, 5.4),
                             sharey=True, squeeze=False, layout="constrained")
    for ax, workload in zip(axes[0], workload_names, strict=True):
        for k, optimizer in enumerate(optimizers):
            style = {"color": colours[optimizer], "marker": _marker(k)}
            if tuning == "full":  # the estimator models full fine-tuning only
                hparams = estimate.shaping(next((r.hparams for r in records if r.optimizer == optimizer), {}))
                predicted = [estimate.estimate(name, optimizer, workload, dtype, device=calibration.device,
                                               precision=precision, calibration=calibration,
                                               hparams=hparams).peak_bytes / GIB for name in ladder]
                ax.plot(sizes, predicted, linestyle="--", linewidth=1.1, alpha=0.75, markersize=3, **style)
            probe = estimate.PROBE[calibration.device]  # cells whose probe could not run have no point here
            measured = sorted((r.params, r.peak_bytes[probe] / GIB) for r in ok
                              if r.optimizer == optimizer and r.workload == workload and r.params
                              and probe in r.peak_bytes)
            if measured:
                xs, ys = zip(*measured, strict=True)
                ax.plot(xs, ys, linestyle="-", linewidth=2, markersize=7, markeredgecolor="black", **style)
        for gpu in gpus:
            ax.axhline(gpu.memory_gib, color="dimgray", linewidth=1, linestyle=":")
            ax.text(0.01, gpu.memory_gib * 1.06, gpu.name, fontsize=8, color="dimgray",
                    transform=ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [_size_label(name) for name in ladder], rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set_title(workload)
        ax.set_xlabel("parameters")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(f"peak memory per device, GiB ({estimate.PROBE[calibration.device]})")
    handles = [Line2D([], [], color=colours[o], marker=_marker(k), label=o)
               for k, o in enumerate(optimizers)]
    handles += [Line2D([], [], color="black", linestyle="-", label="measured"),
                Line2D([], [], color="black", linestyle="--", label="predicted"),
                Line2D([], [], color="dimgray", linestyle=":", label="GPU capacity")]
    fig.legend(handles=handles, loc="outside right center", fontsize=9)
    state = "calibrated" if calibration.calibrated else "uncalibrated"
    fig.suptitle(f"Peak memory against model size, {dtype}, {tuning} tuning "
                 f"(predicted with {state} {calibration.device} constants)")
    return fig


def step_breakdown(records: Sequence[Record]) -> Figure:
    """Median seconds per step split into phases, one bar per optimizer, one panel per workload (first model only)."""
    model = records[0].model
    ok = [r for r in records if r.status == "ok" and r.phases and r.model == model]
    optimizers = list(dict.fromkeys(r.optimizer for r in records))
    workload_names = list(dict.fromkeys(r.workload for r in records))
    phases = list(PHASE_COLOURS) + sorted({p for r in ok for p in r.phases} - set(PHASE_COLOURS))
    extra = plt.get_cmap("Set2")
    colours = {p: PHASE_COLOURS.get(p, extra(i % extra.N)) for i, p in enumerate(phases)}
    fig, axes = plt.subplots(1, len(workload_names), figsize=(4.6 * len(workload_names) + 1.5,
                                                              0.38 * len(optimizers) + 1.8),
                             sharey=True, squeeze=False, layout="constrained")
    by_cell = {(r.optimizer, r.workload): r for r in ok}
    for ax, workload in zip(axes[0], workload_names, strict=True):
        for y, optimizer in enumerate(optimizers):
            record = by_cell.get((optimizer, workload))
            left = 0.0
            for phase in phases:
                seconds = record.phases.get(phase, 0.0) if record else 0.0
                if seconds > 0:
                    ax.barh(y, seconds, left=left, color=colours[phase], edgecolor="white", linewidth=0.5)
                    left += seconds
            if record is None:
                ax.text(0, y, " not measured", va="center", fontsize=8, color="gray")
        ax.set_yticks(range(len(optimizers)), optimizers)
        ax.invert_yaxis()
        ax.set_title(workload)
        ax.set_xlabel("seconds per step (median)")
        ax.grid(True, axis="x", alpha=0.3)
    used = [p for p in phases if any(r.phases.get(p, 0) > 0 for r in ok)]
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[p], label=p) for p in used],
               loc="outside lower center", ncols=len(used), fontsize=9)
    fig.suptitle(f"Step time by phase, {model} on {records[0].device}")
    return fig


def save(fig: Figure, folder: Path, name: str) -> list[Path]:
    """Write ``NAME.png`` and ``NAME.svg`` into ``folder`` and close the figure."""
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths
