"""The memory timeline: the tracker against a count by hand, its categories and phase bands, the tracked step kept
apart from the measured ones, the child's side files, the CUDA snapshot's wiring, the figure, the table, the
commands."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from fakes import FakeCuda, FakeNvml, fake_cuda
from zomem import estimate, measure, models, optim, probes, records, sweep, timeline_report, timelines, workloads
from zomem.cell import Cell
from zomem.cli import main as cli
from zomem.harness import run_cell
from zomem.measure import prepare
from zomem.records import Record
from zomem.timelines import CATEGORIES, OTHER, TIMELINE_FILE, Timeline

MIB = 2**20
SPEC = models.spec("opt-tiny")
SST2 = workloads.get("sst2")
#: bytes of opt-tiny's weights (float32), and of the sst2 batch's storages: token ids and attention mask (int64),
#: the labels, and the two label words (int64)
P = models.param_bytes(models.build_meta("opt-tiny"))
BATCH = 2 * SST2.batch_size * SST2.seq_len * 8 + SST2.batch_size * 8 + 2 * 8
LOGITS = SST2.batch_size * SST2.seq_len * SPEC.vocab * 4
HIDDEN = SST2.batch_size * SST2.seq_len * SPEC.hidden * 4


def tracked(optimizer: str, tmp_path: Path, **hparams: object) -> tuple[Record, Timeline]:
    """One opt-tiny sst2 cell measured in this process, and the timeline of its extra step."""
    path = tmp_path / f"{optimizer}.json"
    record = measure.measure(Cell("opt-tiny", optimizer, "sst2", device="cpu", steps=1, warmup=1, hparams=hparams,
                                  timeline=True), path)
    return record, Timeline.load(path)


def row(timeline: Timeline, index: int) -> dict[str, int]:
    return {c: timeline.series[c][index] for c in CATEGORIES}


def named(timeline: Timeline) -> list[str]:
    """The bands the phase hook named, a forward's sign dropped."""
    return [band.name.split()[0] for band in timeline.phases if band.name not in (OTHER, "optimizer step")]


def test_a_mezo_step_holds_what_a_count_by_hand_says(tmp_path: Path) -> None:
    block = 4096  # every tensor's first block is this large: the walk's one z buffer never grows
    _, t = tracked("mezo", tmp_path, block_size=block)
    at_rest = dict.fromkeys(CATEGORIES, 0) | {"weights": P, "temporaries": BATCH}
    assert row(t, 0) == at_rest and row(t, -1) == at_rest
    peak = t.peak()
    # the second forward's head: its logits and the hidden states it read, z, and L+ (one float) kept for g
    assert peak.categories == at_rest | {"perturbation": 4 * block, "logits": LOGITS + 4,
                                         "temporaries": HIDDEN + BATCH}
    assert peak.bytes == P + 4 * block + LOGITS + 4 + HIDDEN + BATCH
    assert (peak.phase, peak.module) == ("forward −", "lm_head")
    assert t.category_peak("perturbation") == 4 * block


def test_an_adam_step_holds_what_a_count_by_hand_says(tmp_path: Path) -> None:
    _, t = tracked("adam", tmp_path)
    params = len(list(models.build_meta("opt-tiny").parameters()))
    # AdamW's two moments and a float32 step counter per parameter; the last step's gradients until zero_grad
    at_rest = dict.fromkeys(CATEGORIES, 0) | {"weights": P, "optimizer_state": 2 * P + 4 * params, "gradients": P,
                                              "temporaries": BATCH}
    assert row(t, 0) == at_rest and row(t, -1) == at_rest
    forward_end = max(i for i, op in enumerate(t.series["op"]) if op <= t.phases[0].end)
    assert t.phases[0].name == "forward" and row(t, forward_end)["gradients"] == 0  # set to None, not zeroed
    # Classification reads two words of the logits: nothing saves them, so the forward ends holding only the loss's
    # own tensors (the two words' log-softmax, the loss and nll_loss's total weight)
    assert row(t, forward_end)["logits"] == SST2.batch_size * 2 * 4 + 4 + 4
    peak = t.peak()
    # backward's start: every saved activation, the logits' gradient, none of the gradients yet
    assert peak.phase == "backward" and peak.categories["gradients"] == 0
    assert peak.categories["activations"] > 0 and peak.categories["logits"] >= LOGITS
    assert [c for c, _ in peak.largest(2)] == ["activations", "logits"]


@pytest.mark.parametrize("optimizer", ["mezo", "hizoo", "adam"])
def test_phase_bands_run_in_the_phase_timers_order(optimizer: str, tmp_path: Path) -> None:
    class Recording(probes.PhaseTimer):
        def __init__(self) -> None:
            super().__init__("cpu")
            self.names: list[str] = []

        def phase(self, name: str):  # type: ignore[no-untyped-def]
            if not self._in_phase:
                self.names.append(name)
            return super().phase(name)

    prepared = prepare(Cell("opt-tiny", optimizer, "sst2", device="cpu"))
    prepared.step()
    prepared.phases.timer = timer = Recording()
    prepared.step()
    _, t = tracked(optimizer, tmp_path)
    assert named(t) == timer.names
    assert [b.start for b in t.phases] == sorted(b.start for b in t.phases)
    assert [b.start_s for b in t.phases] == sorted(b.start_s for b in t.phases)
    assert t.series["seconds"] == sorted(t.series["seconds"]) and t.series["seconds"][-1] <= t.seconds
    if optimizer == "adam":
        assert [b.name for b in t.phases] == ["forward", "backward", "optimizer step"]


def test_zeroth_order_forwards_say_where_the_weights_are(tmp_path: Path) -> None:
    _, mezo = tracked("mezo", tmp_path)
    assert [b.name for b in mezo.phases if b.name.startswith("forward")] == ["forward +", "forward −"]
    _, hizoo = tracked("hizoo", tmp_path)
    assert [b.name for b in hizoo.phases if b.name.startswith("forward")] == ["forward", "forward +", "forward −"]


def test_mezo_adds_nothing_to_inference_but_its_perturbation_block(tmp_path: Path) -> None:
    _, inference = tracked("inference", tmp_path)
    _, mezo = tracked("mezo", tmp_path)
    block = 4 * min(1 << 20, max(p.numel() for p in models.build_meta("opt-tiny").parameters()))
    for category in CATEGORIES:
        if category != "perturbation":
            # mezo keeps L+, one float, through its second forward
            assert mezo.category_peak(category) <= inference.category_peak(category) + 4, category
    assert inference.category_peak("perturbation") == 0
    forwards = [(b.start, b.end) for b in mezo.phases if b.name.startswith("forward")]
    during = [v for op, v in zip(mezo.series["op"], mezo.series["perturbation"], strict=True)
              if any(s < op <= e for s, e in forwards)]
    assert set(during) == {block}


def test_hizoo_keeps_its_hessian_beside_the_weights_through_all_three_forwards(tmp_path: Path) -> None:
    _, t = tracked("hizoo", tmp_path)
    forwards = [(b.start, b.end) for b in t.phases if b.name.startswith("forward")]
    assert len(forwards) == 3
    state = [v for op, v in zip(t.series["op"], t.series["optimizer_state"], strict=True)
             if any(s < op <= e for s, e in forwards)]
    assert set(state) == {P}


def test_the_tracked_step_is_neither_timed_nor_counted(tmp_path: Path) -> None:
    record, t = tracked("mezo", tmp_path)
    assert record.step_seconds["n"] == 1 and record.forwards_per_step == 2
    assert record.phases["forward"] > 0  # the measured step's phases, timed before tracking began
    assert len([b for b in t.phases if b.name.startswith("forward")]) == 2
    assert (t.measured, t.baseline) == (record.peak_bytes, record.baseline_bytes)


def test_a_timeline_cells_child_hands_its_timeline_over_beside_a_plain_record(tmp_path: Path) -> None:
    record = run_cell(Cell("opt-tiny", "adam", "sst2", device="cpu", steps=1, timeline=True), side_dir=tmp_path)
    assert record.status == "ok"
    t = Timeline.load(tmp_path / TIMELINE_FILE)
    # the process's high-water mark above its floor holds every tracked tensor, and more
    assert 0 < t.peak().bytes <= t.process_peak()
    assert "timeline" not in json.loads(record.to_json())


def test_on_cuda_the_tracked_step_is_also_recorded_as_an_allocator_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, FakeCuda(), FakeNvml())
    calls: list[dict[str, object]] = []

    def record_history(enabled: str | None = "all", **kwargs: object) -> None:
        calls.append({"enabled": enabled, **kwargs})

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record_history)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: Path(path).write_bytes(b"snapshot"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 32 * MIB)  # a cuBLAS workspace, say
    path = tmp_path / TIMELINE_FILE
    measure.measure(Cell("opt-tiny", "mezo", "sst2", device="cuda", steps=1, timeline=True), path)
    assert (tmp_path / timelines.SNAPSHOT_FILE).read_bytes() == b"snapshot"
    assert calls[0]["enabled"] == "all" and calls[0]["stacks"] == "python" and calls[-1]["enabled"] is None
    t = Timeline.load(path)
    assert t.snapshot == timelines.SNAPSHOT_FILE and t.process_probe == "torch_allocated"
    # the fake card's tensors live on the CPU: nothing on cuda:0 was tracked, all it allocated is untracked
    assert t.untracked_bytes == 32 * MIB and t.peak().bytes == 0


def test_timelines_are_written_as_they_arrive_and_reused_when_resuming(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _, mezo = tracked("mezo", source)
    ran: list[str] = []

    def child(cell: Cell, timeout: float | None = None, side_dir: Path | None = None) -> Record:
        ran.append(cell.optimizer)
        assert cell.timeline and side_dir is not None
        mezo.optimizer, mezo.snapshot = cell.optimizer, timelines.SNAPSHOT_FILE
        mezo.save(side_dir / TIMELINE_FILE)
        (side_dir / timelines.SNAPSHOT_FILE).write_bytes(b"snapshot")
        return measure.record_for(cell)

    monkeypatch.setattr(sweep, "run_cell", child)
    out = tmp_path / "memory_timeline.json"
    cells = sweep.plan(["opt-tiny"], ["mezo", "adam"], ["sst2"], sweep.Settings(device="cpu"))
    found, failed = sweep.Tracking(cells, out).finish()
    assert [t.optimizer for t in found] == ran == ["mezo", "adam"] and not failed
    assert [t.snapshot for t in found] == ["memory_snapshot_mezo.pickle", "memory_snapshot_adam.pickle"]
    assert all((tmp_path / t.snapshot).read_bytes() == b"snapshot" for t in found)
    assert [t.optimizer for t in timelines.read(out)] == ["mezo", "adam"]
    assert sweep.snapshot_name("my_optim:ClippedZO") == "memory_snapshot_my_optim_ClippedZO.pickle"
    ran.clear()
    again, _ = sweep.Tracking(cells, out, resume=True).finish()
    assert ran == [] and [t.optimizer for t in again] == ["mezo", "adam"]


def test_every_registered_optimizers_step_can_be_tracked_and_drawn(tmp_path: Path) -> None:
    tracked_all = []
    for name in optim.OPTIMIZERS.names():
        _, t = tracked(name, tmp_path)
        assert row(t, 0)["weights"] == row(t, -1)["weights"] == P, name
        assert row(t, -1)["perturbation"] == 0, name  # a walk's buffers are released when its step ends
        assert t.peak().bytes > row(t, 0)["weights"] + row(t, 0)["optimizer_state"], name
        tracked_all.append(t)
    plt.close(timeline_report.figure(tracked_all))


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> list[Timeline]:
    folder = tmp_path_factory.mktemp("five")
    return [tracked(o, folder)[1] for o in ("inference", "mezo", "hizoo", "adamezo", "adam")]


def _overlap(a, b) -> bool:  # type: ignore[no-untyped-def]
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_figure_names_every_phase_and_its_labels_do_not_overlap(five: list[Timeline]) -> None:
    fig = timeline_report.figure(five)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in panels] == [t.optimizer for t in five]
    texts = []
    for ax, t in zip(panels, five, strict=True):
        top = next(child for child in ax.child_axes)
        labels = [label for label in top.get_xticklabels() if label.get_text()]
        named = [b.name for b in t.phases if b.name != OTHER and b.end > b.start]
        assert [label.get_text() for label in labels] == named
        annotation = next(child for child in ax.texts)
        assert annotation.get_text().startswith(f"peak {timeline_report._mib(t.peak().bytes)} MiB in {t.peak().phase}")
        texts += [label.get_window_extent(renderer) for label in labels]
        texts += [annotation.get_bbox_patch().get_window_extent(renderer), ax.title.get_window_extent(renderer)]
    for i, a in enumerate(texts):
        for b in texts[i + 1:]:
            assert not _overlap(a, b)
    legend = {text.get_text() for text in fig.legends[0].get_texts()}
    assert {"weights", "optimizer state", "gradients", "perturbation buffers", "activations saved for backward",
            "logits and loss"} <= legend
    plt.close(fig)


def test_the_table_names_each_peak_its_phase_module_and_categories(five: list[Timeline]) -> None:
    table = timeline_report.table(five)
    rows = {r[0]: r for r in table.rows}
    assert rows["adam"][2:4] == ["backward", "head"]
    assert rows["hizoo"][2] == "forward −" and "optimizer state 1.1" in rows["hizoo"][4]
    assert rows["mezo"][4].startswith("logits and loss 4.0; weights 1.1; perturbation buffers")
    long = list(csv.DictReader(io.StringIO(table.csv())))
    assert [r["optimizer"] for r in long] == ["inference", "mezo", "hizoo", "adamezo", "adam"]
    adam = long[-1]
    assert int(adam["peak_bytes"]) == sum(int(adam[f"{c}_bytes"]) for c in CATEGORIES)
    assert adam["probe"] == "cpu_hwm" and int(adam["measured_bytes"]) == five[-1].process_peak()
    assert int(adam["estimator_bytes"]) == timeline_report.tensor_prediction(five[-1]) > 0


def test_opt125m_adam_peak_is_the_estimators_tensor_prediction(tmp_path: Path) -> None:
    # In a child, as the harness measures: in pytest's process, memory freed by earlier tests is reused without
    # raising RSS, so the process's rise could fall under the tensors tracked at once.
    run_cell(Cell("opt-125m", "adam", "sst2", device="cpu", steps=1, warmup=1, warmup_batch=1, timeline=True),
             side_dir=tmp_path)
    t = Timeline.load(tmp_path / TIMELINE_FILE)
    predicted = estimate.estimate("opt-125m", "adam", "sst2", "float32", device="cpu",
                                  calibration=estimate.Calibration.load("cpu").tensors_only()).worst.total
    assert t.peak().bytes == pytest.approx(predicted, rel=0.05)
    assert t.peak().bytes <= t.process_peak()


def test_timeline_and_report_commands_write_the_figure_table_and_series(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "timeline"
    assert cli(["timeline", "--model", "opt-tiny", "--optimizers", "mezo", "adam", "--workload", "sst2",
                "--device", "cpu", "--out", str(out)]) == 0
    for name in ("png", "svg", "json", "md", "csv", "tex"):
        assert (out / f"memory_timeline.{name}").stat().st_size > 0, name
    assert [t.optimizer for t in timelines.read(out / "memory_timeline.json")] == ["mezo", "adam"]
    assert "| adam " in capsys.readouterr().out
    report = tmp_path / "report"
    args = ["report", "--models", "opt-tiny", "--optimizers", "inference", "mezo", "--workloads", "sst2",
            "--device", "cpu", "--hardware", "1xA100-80GB", "--out", str(report), "--timeline"]
    children: list[tuple[str, bool]] = []
    real = sweep.run_cell
    monkeypatch.setattr(sweep, "run_cell", lambda cell, **options: children.append(
        (cell.optimizer, cell.timeline)) or real(cell, **options))
    assert cli(args) == 0
    # each cell measured once: the child that measures a tracked cell tracks its step too
    assert children == [("inference", True), ("mezo", True)]
    assert [r.optimizer for r in records.read(report / "records.jsonl")] == ["inference", "mezo"]
    index = (report / "index.md").read_text()
    assert "](memory_timeline.png)" in index and "](memory_timeline.json)" in index and "| mezo " in index
    first = (report / "memory_timeline.json").read_text()
    assert cli([*args, "--resume"]) == 0
    assert (report / "memory_timeline.json").read_text() == first  # reused, not tracked again
    (report / "memory_timeline.json").unlink()
    children.clear()
    assert cli([*args, "--resume"]) == 0  # the records are kept; the steps are tracked in children of their own
    assert children == [("inference", True), ("mezo", True)]
    assert len(records.read(report / "records.jsonl")) == 2
    assert [t.optimizer for t in timelines.read(report / "memory_timeline.json")] == ["inference", "mezo"]
