"""The report: tables from records, a resumable sweep, and one real end-to-end report on a tiny model."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from processes import gone, measuring_child
from zomem import fit, records, report, sweep
from zomem.cell import Cell
from zomem.cli import fit as fit_cli
from zomem.cli import main as cli
from zomem.cli import run as run_cli
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


def test_gpu_cells_whose_nvml_probe_could_not_run_show_torch_reserved_and_say_so() -> None:
    cells = [record_for(Cell("opt-tiny", optimizer, "sst2", device="cuda"), params=1000,
                        peak_bytes={"torch_allocated": peak * MIB, "torch_reserved": (peak + 50) * MIB},
                        probe_methods={"nvml": "unavailable"}) for optimizer, peak in (("mezo", 150), ("adam", 350))]
    table = report.peak_memory(cells)
    assert table.rows == [["mezo", "200 (1.00x)"], ["adam", "400 (2.00x)"]]
    assert "`torch_reserved`" in table.notes[0] and "`nvml`" not in table.notes[0]
    assert {row["probe"] for row in csv.DictReader(io.StringIO(table.csv()))} == {"torch_reserved"}


def test_memory_breakdown_lists_each_measured_cell_with_its_state_in_copies_of_the_trainable_parameters() -> None:
    adam = measured("adam", "sst2", 1000, [3.0])
    adam.trainable_params, adam.state_dtype, adam.breakdown_probe = 25 * MIB, "float32", "cpu_hwm"
    adam.breakdown = {"weights": 100 * MIB, "trainable": 100 * MIB, "optimizer_state": 200 * MIB,
                      "gradients": 100 * MIB, "transient": 350 * MIB, "logits": 50 * MIB}
    table = report.memory_breakdown([adam, RECORDS[3]])
    assert table.rows == [["adam", "sst2", "full", f"{25 * MIB:,}", "100.0", "200.0 (2.00P)", "100.0", "350.0",
                           "50.0", "1,000", "float32"]]
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


REPORT = ["report", "--models", "opt-tiny", "--optimizers", "inference", "mezo", "--workloads", "sst2", "--device",
          "cpu", "--hardware", "1xA100-80GB"]


def test_a_report_into_a_place_that_cannot_be_written_is_refused_before_any_cell_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep, "run_cell", lambda *args, **kwargs: pytest.fail("a cell ran"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli([*REPORT, "--out", str(blocker / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write into" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [
    ["run", "--model", "opt-tiny", "--optimizer", "mezo", "--workload", "sst2", "--device", "cpu", "--out"],
    ["fit", "--measure", "--models", "opt-tiny", "--optimizer", "mezo", "--device", "cpu", "--budget", "1GiB",
     "--records"]], ids=["run", "fit"])
def test_records_into_a_folder_are_refused_before_any_cell_runs(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (run_cli, fit_cli):
        monkeypatch.setattr(module, "run_cell", lambda *args, **kwargs: pytest.fail("a cell ran"))
    assert cli([*command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot append records to" in err and "Is a directory" in err


def test_a_second_sweep_into_a_folder_in_use_is_refused_naming_the_holder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep, "run_cell", lambda *args, **kwargs: pytest.fail("a cell ran"))
    out = tmp_path / "report"
    with sweep.locked(out):
        assert cli([*REPORT, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"another zomem sweep (pid {os.getpid()})" in err
    assert not (out / "records.jsonl").exists()


def test_a_lock_left_by_a_sweep_that_died_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "report"
    # a holder killed with the lock held, as the kernel's OOM killer or `kill -9` would leave it
    holder = subprocess.run([sys.executable, "-c", "import os, sys, pathlib; from zomem import sweep\n"
                             "with sweep.locked(pathlib.Path(sys.argv[1])): os.kill(os.getpid(), 9)", str(out)])
    assert holder.returncode == -signal.SIGKILL and (out / sweep.LOCK_FILE).read_text().strip().isdigit()
    with sweep.locked(out):
        assert (out / sweep.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert (out / sweep.LOCK_FILE).read_text() == ""


def test_a_sweep_terminated_mid_cell_keeps_its_records_and_leaves_no_child(tmp_path: Path, faults: None) -> None:
    out, marker = tmp_path / "report", tmp_path / "stepping"
    argv = [*REPORT[:4], "inference", "zomem_faults:Sleeps", *REPORT[6:], "--out", str(out)]
    report_process = subprocess.Popen([sys.executable, "-m", "zomem", *argv], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "ZOMEM_FAULT_MARK": str(marker)})
    try:
        child = measuring_child(report_process, marker)
        report_process.send_signal(signal.SIGTERM)  # how Slurm cancels a job, and CI ends one that ran too long
        _, stderr = report_process.communicate(timeout=60)
    finally:
        report_process.kill()
    assert report_process.returncode == 128 + signal.SIGTERM
    assert gone(child)
    said = [line for line in stderr.splitlines() if "zomem report" in line]
    assert said == ["zomem report: terminated (SIGTERM); records written so far are kept"], stderr
    assert "Traceback" not in stderr
    assert [(r.optimizer, r.status) for r in records.read(out / "records.jsonl")] == [("inference", "ok")]
