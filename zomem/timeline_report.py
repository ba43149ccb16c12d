"""The memory timeline's figure, table and index section, drawn from timelines (never from live state)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from zomem import estimate  # noqa: E402
from zomem.errors import UsageError  # noqa: E402
from zomem.figures import PHASE_COLOURS, save  # noqa: E402
from zomem.hardware import MIB  # noqa: E402
from zomem.report import Section  # noqa: E402
from zomem.tables import MISSING, Table  # noqa: E402
from zomem.timelines import CATEGORIES, LABELS, OTHER, Band, Peak, Timeline, module_label  # noqa: E402

NAME = "memory_timeline"
TITLE = "Memory over one step"
#: one colour per category, apart from each other and from the phase bands' tints
COLOURS = {"weights": "#9AA7B8", "optimizer_state": "#F0A030", "gradients": "#D0404A", "autocast_cache": "#8C6D4F",
           "perturbation": "#10A050", "activations": "#7E5BC2", "logits": "#2FA8C8", "temporaries": "#D9D9D9"}
#: a panel's width in inches, and the points of it the axes take (the rest: the byte axis' labels)
PANEL_INCHES = 7.2
AXES_POINTS = PANEL_INCHES * 72 * 0.9
#: points a band label's character takes at the labels' font size
LABEL_POINTS_PER_CHAR = 4.6
#: a named phase's band is drawn at least this share of its panel wide, and wide enough for its label, so that a
#: phase of a few operations (Adam's fused update) can be seen and named beside a backward of thousands; ``other``
#: keeps its own share, and its label only where that is wide enough
MIN_BAND = 0.08
#: a band's tint is its phase's colour in the step-time figure; what runs after a backward is the optimizer's update
BAND_COLOURS = {"optimizer step": PHASE_COLOURS["update"]}


def _label_share(name: str) -> float:
    """The share of a panel a band label takes, with a little room either side."""
    return (len(name) * LABEL_POINTS_PER_CHAR + 8) / AXES_POINTS


def _band_colour(name: str) -> str:
    return BAND_COLOURS.get(name) or PHASE_COLOURS.get(name.split()[0], PHASE_COLOURS["other"])


def by_time(timeline: Timeline) -> bool:
    """Whether the timeline is drawn against seconds: a CPU step runs as it is dispatched, so its seconds show how
    long each tensor lives (the logits live as long as the head's matmul takes); on a GPU the host runs ahead of the
    kernels and seconds would mislead, so it is drawn against the operations in order."""
    return not timeline.device.startswith("cuda")


def _span(timeline: Timeline, band: Band) -> tuple[float, float]:
    return (band.start_s, band.end_s) if by_time(timeline) else (band.start, band.end)


def axis(timeline: Timeline) -> Callable[[Any], Any]:
    """Seconds (or operation index) → position across the panel, 0 to 1: each phase band takes its share of the
    step, a named phase at least :data:`MIN_BAND` and room for its label; linear within a band."""
    bands = [(band.name, *_span(timeline, band)) for band in timeline.phases if band.end > band.start]
    if not bands:
        return lambda x: np.zeros_like(np.asarray(x, dtype=float))
    widths = np.array([max(end - start, 0.0) for _, start, end in bands], dtype=float)
    minimum = np.array([0.0 if name == OTHER else max(MIN_BAND, _label_share(name)) for name, _, _ in bands])
    if minimum.sum() > 1:  # more phases than room (FZOO's many probes): each its equal part, some unnamed
        minimum /= minimum.sum()
    # Widen the bands below their minimum to it and share the rest among the others in proportion; widening may
    # push another below its own, so until none is.
    widened = np.zeros(len(bands), dtype=bool)
    while True:
        rest = widths * ~widened
        shares = np.where(widened, minimum, rest / max(rest.sum(), 1e-12) * (1 - minimum[widened].sum()))
        below = (shares < minimum - 1e-12) & ~widened
        if not below.any() or widened.sum() + below.sum() == len(bands):
            break
        widened |= below
    edges = [bands[0][1]] + [end for _, _, end in bands]
    positions = np.concatenate([[0.0], np.cumsum(shares)])
    return lambda x: np.interp(x, edges, positions)


def _op_positions(ops: Sequence[int]) -> np.ndarray:
    """Where each row of a series sits in operation units: the rows at one operation spread evenly across it, so
    a tensor allocated and freed within one operation still shows."""
    ops_array = np.asarray(ops, dtype=float)
    x = ops_array.copy()
    start = 0
    while start < len(ops_array):
        end = start
        while end < len(ops_array) and ops_array[end] == ops_array[start]:
            end += 1
        count = end - start
        if ops_array[start] > 0:
            x[start:end] = ops_array[start] - 1 + (np.arange(count) + 1) / (count + 1)
        start = end
    return x


def _units(timelines: Sequence[Timeline]) -> tuple[float, str]:
    largest = max(t.peak().bytes for t in timelines)
    return (2**30, "GiB") if largest >= 8 * 2**30 else (MIB, "MiB")


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f}" if n >= 10 * MIB else f"{n / MIB:,.1f}"


def peak_words(peak: Peak, n: int = 3) -> str:
    """The peak's largest categories, largest first: ``weights 478 · logits and loss 196 · …`` (MiB)."""
    parts = [f"{LABELS[c]} {_mib(b)}" for c, b in peak.largest(n)]
    more = sum(1 for v in peak.categories.values() if v > 0) - n
    return " · ".join(parts) + (" · …" if more > 0 else "")


def _panel(ax: Axes, timeline: Timeline, scale: float, present: list[str]) -> None:
    to_x = axis(timeline)
    if by_time(timeline):
        x = to_x(np.append(timeline.series["seconds"], timeline.seconds))
    else:
        x = to_x(np.append(_op_positions(timeline.series["op"]), timeline.ops))
    bottom = np.zeros(len(x))
    for category in present:
        values = np.asarray(timeline.series[category] + timeline.series[category][-1:], dtype=float) / scale
        # rasterized: thousands of steps per area would make the SVG megabytes; its text stays text
        ax.fill_between(x, bottom, bottom + values, step="post", color=COLOURS[category], linewidth=0,
                        rasterized=True)
        bottom = bottom + values
    ax.step(x, bottom, where="post", color="black", linewidth=0.6, rasterized=True)
    labels, centres = [], []
    for k, band in enumerate(timeline.phases):
        if band.end <= band.start:
            continue
        name = band.name
        left, right = (float(v) for v in to_x(_span(timeline, band)))
        ax.axvspan(left, right, color=_band_colour(name), alpha=0.13 if k % 2 == 0 else 0.22, linewidth=0, zorder=0)
        ax.axvline(left, color="dimgray", linewidth=0.4, zorder=0)
        if _label_share(name) <= right - left + 1e-6:
            labels.append(name)
            centres.append((left + right) / 2)
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, labels, fontsize=7.5)
    top.tick_params(length=0, pad=2)
    peak = timeline.peak()
    peak_x = float(x[peak.row])
    ax.plot([peak_x], [peak.bytes / scale], marker="v", color="black", markersize=6, zorder=5)
    process = timeline.process_peak()
    if process is not None:
        ax.axhline(process / scale, color="black", linestyle=(0, (4, 3)), linewidth=0.8)
    right = peak_x > 0.55
    where = f"{peak.phase}" + (f", {module_label(peak.module)}" if peak.module else "")
    ax.annotate(f"peak {_mib(peak.bytes)} MiB in {where}\n{peak_words(peak, 4)}", xy=(peak_x, peak.bytes / scale),
                xytext=(0.99 if right else 0.01, 0.95), textcoords="axes fraction", ha="right" if right else "left",
                va="top", fontsize=7.5, arrowprops={"arrowstyle": "-", "color": "black", "linewidth": 0.6},
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.92})
    ax.set_xlim(0, 1)
    ax.set_xticks([])
    ax.set_title(timeline.optimizer, loc="left", fontsize=10, fontweight="bold", pad=14)
    ax.grid(True, axis="y", alpha=0.3)


def figure(timelines: Sequence[Timeline]) -> Figure:
    """One panel per optimizer on a shared byte axis: live tracked bytes stacked by category against the step's
    operations, its phases as labelled bands, the peak marked and annotated with its largest categories."""
    scale, unit = _units(timelines)
    present = [c for c in CATEGORIES if any(max(t.series[c]) > 0 for t in timelines)]
    cols = 1 if len(timelines) <= 3 else 2
    rows = -(-len(timelines) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES * cols + 0.6, 2.5 * rows + 1.3), sharey=True,
                             squeeze=False, layout="constrained")
    for ax, timeline in zip(axes.flat, timelines, strict=False):
        _panel(ax, timeline, scale, present)
    for ax in axes.flat[len(timelines):]:
        ax.set_visible(False)
    top = max(t.peak().bytes for t in timelines) / scale
    axes[0][0].set_ylim(0, top * 1.5)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"live tensors, {unit}")
    unit = "seconds into the step" if by_time(timelines[0]) else "operations dispatched, in order"
    for ax in axes[-1]:
        ax.set_xlabel(f"{unit} (phases too short to read widened)", fontsize=8)
    first = timelines[0]
    probe = "torch_allocated" if first.device.startswith("cuda") else "cpu_hwm − floor"
    handles = [Patch(color=COLOURS[c], label=LABELS[c]) for c in present]
    handles.append(plt.Line2D([], [], color="black", linestyle=(0, (4, 3)), linewidth=0.8,
                              label=f"measured steps' peak ({probe})"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8.5)
    fig.suptitle(f"Memory over one step: {first.model}, {first.workload}, {first.dtype} on {first.device} "
                 "(tensors tracked at the dispatcher; ▼ the peak)", fontsize=11)
    return fig


def tensor_prediction(timeline: Timeline) -> int | None:
    """The estimator's live-tensor peak for the timeline's cell (weights + state + gradients + autocast cache +
    transient, no overhead, unit multipliers); None where it has none (tuning other than full)."""
    if timeline.tuning != "full":
        return None
    kind = estimate.device_kind(timeline.device)
    try:
        return estimate.estimate(timeline.model, timeline.optimizer, timeline.workload, timeline.dtype, device=kind,
                                 precision=timeline.precision, hparams=estimate.shaping(timeline.hparams),
                                 calibration=estimate.Calibration.load(kind).tensors_only()).worst.total
    except UsageError:
        return None


def table(timelines: Sequence[Timeline]) -> Table:
    """One row per optimizer: the tracked peak, its phase, the module running then and what it held, beside the
    measured steps' peak and the estimator's prediction of live tensors."""
    rows, long = [], []
    probes = {t.process_probe for t in timelines}
    for t in timelines:
        peak, process, predicted = t.peak(), t.process_peak(), tensor_prediction(t)
        held = "; ".join(f"{LABELS[c]} {_mib(b)}" for c, b in peak.largest(len(CATEGORIES)))
        rows.append([t.optimizer, _mib(peak.bytes), peak.phase, module_label(peak.module), held,
                     MISSING if process is None else _mib(process), MISSING if predicted is None else _mib(predicted)])
        long.append([t.model, t.optimizer, t.workload, t.device, peak.bytes, peak.op, peak.phase, peak.module,
                     *(peak.categories[c] for c in CATEGORIES), t.process_probe,
                     "" if process is None else process, "" if predicted is None else predicted,
                     "" if t.untracked_bytes is None else t.untracked_bytes])
    measured = " or ".join(sorted(f"`{p}`" + (" less the floor read before the model was built" if p == "cpu_hwm"
                                                else "") for p in probes))
    notes = ["Tracked: every tensor storage made or freed during one more step after the measured ones (never timed, "
             "never under the probes), seen at the dispatcher: what the operations return, not what a kernel keeps "
             "inside itself. Module: the innermost module running at the peak (in a backward, the one whose output's "
             f"gradient arrived last; `loss`: outside the model). Measured: the measured steps' {measured}, which "
             "holds what tracking cannot see (allocator slack, kernels' scratch). Estimator: its prediction of the "
             "live tensors (weights + optimizer state + gradients + autocast cache + transient, no overhead, unit "
             "multipliers)."]
    untracked = [t for t in timelines if t.untracked_bytes is not None]
    if untracked:
        notes.append("Allocator bytes alive at the start of the step that no dispatched operation made (cuBLAS "
                     "workspaces): " + ", ".join(f"{t.optimizer} {_mib(t.untracked_bytes or 0)} MiB"
                                                  for t in untracked) + ".")
    first = timelines[0]
    return Table(NAME, f"Memory over one step, MiB: {first.model}, {first.workload}, {first.dtype} on {first.device}",
                 ["optimizer", "peak", "phase", "module", "at the peak", "measured", "estimator"], rows,
                 ["model", "optimizer", "workload", "device", "peak_bytes", "peak_op", "phase", "module",
                  *(f"{c}_bytes" for c in CATEGORIES), "probe", "measured_bytes", "estimator_bytes",
                  "untracked_bytes"], long, notes)


def section(timelines: Sequence[Timeline], tracked: Table) -> Section:
    """The index page's part on the timeline: its files, the figure and the table."""
    snapshots = [t.snapshot for t in timelines if t.snapshot]
    files = [f"- {tracked.title}: [{NAME}.md]({NAME}.md), [{NAME}.csv]({NAME}.csv), [{NAME}.tex]({NAME}.tex); "
             f"figure [{NAME}.png]({NAME}.png), [{NAME}.svg]({NAME}.svg); the series [{NAME}.json]({NAME}.json)"]
    if snapshots:
        files.append("- CUDA allocator snapshots of the tracked steps, for PyTorch's memory viewer "
                     "(https://pytorch.org/memory_viz): " + ", ".join(f"[{s}]({s})" for s in snapshots))
    against = "seconds" if by_time(timelines[0]) else "the operations in order"
    body = [f"![Memory over one step]({NAME}.png)", "",
            f"Live tensor bytes over one extra step per optimizer, stacked by what each tensor is, against {against}; "
            "the bands are the step's phases (a forward is `forward +` or `forward −` while the weights carry a "
            "perturbation of that sign), ▼ the peak, the dashed line the measured steps' peak.", "",
            f"**{tracked.title}**", "", tracked.markdown().rstrip("\n")]
    return Section(TITLE, files, body)


def write(folder: Path, timelines: Sequence[Timeline]) -> tuple[list[Path], Table]:
    """Write the figure (PNG, SVG) and the table (Markdown, CSV, LaTeX) into ``folder``; the paths, and the table."""
    tracked = table(timelines)
    return save(figure(timelines), folder, NAME) + tracked.write(folder), tracked
