"""The report: tables from records, a resumable sweep, and one real end-to-end report on a tiny model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from zomem import fit, records, report, sweep
from zomem.cell import Cell
from zomem.cli import main as cli
from zomem.errors import UsageError
from zomem.measure import record_for
from zomem.records import Record

MIB = 2**20
FILES = [f"{name}.{ext}" for name in ("peak_memory", "memory_breakdown", "step_time", "largest_fit")
         for ext in ("md", "csv", "tex")]
FILES += ["memory_vs_size.png", "memory_vs_size.svg", "step_breakdown.png", "step_breakdown.svg", "records.jsonl",
          "index.md"]


def measured(optimizer: str, workload: str, peak_mib: float, seconds: list[float], status: str = "ok") -> Record:
    cell = Cell("opt-tiny", optimizer, workload, device="cpu", steps=len(seconds))
    if status != "ok":
        return record_for(cell, status=status, error="out of memory")
    median = sorted(seconds)[len(seconds) // 2]
    return record_for(cell, peak_bytes={"cpu_hwm": int(peak_mib * MIB)}, params=1000,
                      step_seconds={"median": median, "iqr": max(seconds) - min(seconds), "n": len(seconds)},
                      phases={"forward": median * 0.8, "other": median * 0.2}, forwards_per_step=2.0)


RECORDS = [measured("mezo", "sst2", 400, [1.0, 1.2]), measured("adam", "sst2", 1000, [3.0, 3.5]),
           measured("mezo", "copa", 500, [2.0]), measured("adam", "copa", 0, [], status="oom")]


def test_peak_memory_table_shows_mib_and_the_ratio_to_mezo() -> None:
    table = report.peak_memory(RECORDS)
    assert table.headers == ["optimizer", "sst2", "copa"]
    assert table.rows == [["mezo", "400 (1.00x)", "500 (1.00x)"], ["adam", "1,000 (2.50x)", "OOM"]]
    rows = {(r["optimizer"], r["workload"]): r for r in csv.DictReader(io.StringIO(table.csv()))}
    adam = rows[("adam", "sst2")]
    assert adam["peak_bytes"] == str(1000 * MIB) and adam["ratio_to_mezo"] == "2.5" and adam["probe"] == "cpu_hwm"
    assert rows[("adam", "copa")]["status"] == "oom"
    markdown = table.markdown()
    assert markdown.splitlines()[1].startswith("|---") and "cpu_hwm" in markdown
    assert "\\toprule" in table.latex() and "cpu\\_hwm" in table.latex()


def test_memory_breakdown_lists_each_measured_cell_with_its_state_in_copies_of_the_trainable_parameters() -> None:
    adam = measured("adam", "sst2", 1000, [3.0])
    adam.trainable_params, adam.state_dtype, adam.breakdown_probe = 25 * MIB, "float32", "cpu_hwm"
    adam.breakdown = {"weights": 100 * MIB, "trainable": 100 * MIB, "optimizer_state": 200 * MIB,
                      "gradients": 100 * MIB, "transient": 350 * MIB}
    table = report.memory_breakdown([adam, RECORDS[3]])
    assert table.rows == [["adam", "sst2", "full", f"{25 * MIB:,}", "100.0", "200.0 (2.00P)", "100.0", "350.0",
                           "1,000", "float32"]]
    [row] = csv.DictReader(io.StringIO(table.csv()))
    assert row["optimizer_state_copies"] == "2.0" and row["peak_bytes"] == str(1000 * MIB)
    assert "`cpu_hwm`" in table.notes[0]


def test_step_time_table_shows_median_iqr_and_forwards() -> None:
    table = report.step_time(RECORDS)
    assert table.rows[0] == ["mezo", "1.200 (0.200)", "2.000 (–)", "2"]
    assert any("one measured step" in note for note in table.notes)


def test_largest_fit_table_marks_the_source_and_its_csv_has_the_four_columns() -> None:
    fits = [fit.Fit("1xA100-80GB", "mezo", "multirc", "float16", "pure", "predicted", 1, "opt-30b", []),
            fit.Fit("1xA100-80GB", "adam", "multirc", "float16", "mixed", "measured", 1, None, [])]
    table = report.largest_fit(fits, ["1xA100-80GB"], ["mezo", "adam"])
    assert table.rows == [["1xA100-80GB", "opt-30b (p)", "none (m)"]]
    assert table.csv().splitlines() == ["hardware,optimizer,model,source", "1xA100-80GB,mezo,opt-30b,predicted",
                                        "1xA100-80GB,adam,none,measured"]


class FakeRunner:
    """Stands in for the harness: appends a record per cell, and can be interrupted like Ctrl-C."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.interrupt_at = interrupt_at

    def __call__(self, cell: Cell, out: Path, timeout: float | None = None) -> Record:
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(cell.optimizer)
        record = measured(cell.optimizer, cell.workload, 100, [1.0])
        record.steps, record.warmup, record.warmup_batch = cell.steps, cell.warmup, cell.warmup_batch
        records.append(out, record)
        return record


def test_an_interrupted_sweep_keeps_its_records_and_resume_finishes_only_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cells = sweep.plan(["opt-tiny"], ["inference", "mezo", "sgd", "adam"], ["sst2"],
                       sweep.Settings(device="cpu", steps=1, warmup=1, warmup_batch=1))
    out = tmp_path / "records.jsonl"
    monkeypatch.setattr(sweep, "run_cell", FakeRunner(interrupt_at=2))
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cells, out)
    assert [r.optimizer for r in records.read(out)] == ["inference", "mezo"]
    with pytest.raises(UsageError, match="--resume"):
        sweep.run(cells, out)
    runner = FakeRunner()
    monkeypatch.setattr(sweep, "run_cell", runner)
    done = sweep.run(cells, out, resume=True)
    assert runner.calls == ["sgd", "adam"]
    assert [r.optimizer for r in done] == ["inference", "mezo", "sgd", "adam"]
    # other settings are other cells: nothing measured with one step is reused for three
    more = sweep.plan(["opt-tiny"], ["mezo"], ["sst2"], sweep.Settings(device="cpu", steps=3))
    runner.calls.clear()
    sweep.run(more, out, resume=True)
    assert runner.calls == ["mezo"]


def test_report_command_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    args = ["report", "--models", "opt-tiny", "--optimizers", "inference", "mezo", "adam", "--workloads", "sst2",
            "--device", "cpu", "--hardware", "1xA100-80GB", "2xV100-32GB", "--out", str(out)]
    assert cli(args) == 0
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    index = (out / "index.md").read_text()
    for name in FILES[:-1]:
        assert f"]({name})" in index, name
    assert "worst residual" in index and "cpu_hwm" in index and "multirc" in index
    assert "`cpu_hwm` by `clear_refs` in 3 cells" in index
    assert "AMD" in index or "CPU" in index
    rows = list(csv.DictReader((out / "largest_fit.csv").open()))
    assert [r["hardware"] for r in rows] == ["1xA100-80GB"] * 3 + ["2xV100-32GB"] * 3
    assert {r["source"] for r in rows} == {"predicted"}
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["status"] == "ok" for line in lines)
    capsys.readouterr()
    # nothing is missing: --resume measures nothing and rewrites the tables
    assert cli([*args, "--resume"]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 3
    assert cli(args) == 2
    assert "--resume" in capsys.readouterr().err
