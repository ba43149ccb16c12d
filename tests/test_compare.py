"""Tests for zomem.compare and ``zomem compare``: thresholds, the three file kinds, verdicts, the export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from zomem import records
from zomem.cli import main
from zomem.compare import (
    Baseline,
    Measurement,
    Threshold,
    compare,
    github_benchmarks,
    load,
    parse_bytes,
    parse_thresholds,
)
from zomem.records import Record

MiB = 2**20


def record(optimizer: str, peak_mib: float, seconds: float = 0.1, *, status: str = "ok",
           workload: str = "sst2", probe: str = "cpu_hwm") -> Record:
    """A record as the harness writes it, with the figures compare reads."""
    ok = status == "ok"
    return Record(model="opt-tiny", optimizer=optimizer, workload=workload, tuning="full", dtype="float32",
                  device="cpu", batch_size=16, seq_len=64, status=status,  # type: ignore[arg-type]
                  error=None if ok else "OutOfMemoryError: boom",
                  peak_bytes={probe: round(peak_mib * MiB)} if ok else {},
                  step_seconds={"median": seconds, "iqr": 0.0, "n": 3} if ok else {},
                  forwards_per_step=2.0 if ok else None)


def write(path: Path, *rows: Record) -> Path:
    for row in rows:
        records.append(path, row)
    return path


@pytest.mark.parametrize("text,expected", [
    ("6 GiB", 6 * 2**30), ("512MiB", 512 * MiB), ("1.5 GB", 1_500_000_000), ("4096", 4096), ("10kb", 10_000),
])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["six GiB", "6 GiBs", "", "-1 MiB"])
def test_parse_bytes_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="6 GiB"):
        parse_bytes(text)


def test_parse_thresholds() -> None:
    assert parse_thresholds("peak:+2%, time:+10%") == (Threshold("peak", 2.0), Threshold("time", 10.0))
    assert parse_thresholds("nvml:1.5%") == (Threshold("nvml", 1.5),)
    assert parse_thresholds("") == ()


@pytest.mark.parametrize("text", ["peak:2", "memory:+2%", "peak", "peak:+-2%"])
def test_parse_thresholds_names_the_valid_metrics(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="peak, time, cpu_hwm"):
        parse_thresholds(text)


def test_a_probe_threshold_overrides_peak_for_that_probe_only() -> None:
    base = {"c": Measurement("c", peak_bytes={"nvml": 100, "torch_allocated": 100})}
    new = {"c": Measurement("c", peak_bytes={"nvml": 105, "torch_allocated": 105})}
    verdicts = {c.metric: c.verdict for c in compare(base, new, parse_thresholds("peak:+2%,nvml:+10%")).changes}
    assert verdicts == {"nvml": "ok", "torch_allocated": "regression"}


def test_probes_are_compared_with_themselves_only() -> None:
    base = {"c": Measurement("c", peak_bytes={"nvml": 100})}
    new = {"c": Measurement("c", peak_bytes={"torch_allocated": 50})}
    changes = compare(base, new, parse_thresholds("peak:+2%")).changes
    assert [(c.metric, c.base, c.new, c.verdict) for c in changes] == [
        ("nvml", 100, None, "only in base"), ("torch_allocated", None, 50, "only in new")]


@pytest.mark.parametrize("base_status,new_status,verdict", [
    ("ok", "oom", "regression"), ("ok", "error", "regression"), ("oom", "ok", "improved"),
    ("oom", "error", "changed"), ("oom", "oom", "unchecked"),
])
def test_status_changes(base_status: str, new_status: str, verdict: str) -> None:
    base = {"c": Measurement("c", base_status, {"cpu_hwm": 1} if base_status == "ok" else {})}
    new = {"c": Measurement("c", new_status, {"cpu_hwm": 1} if new_status == "ok" else {})}
    changes = compare(base, new).changes
    assert [(c.metric, c.verdict) for c in changes] == [("status", verdict)]


def test_improvement_beyond_the_threshold_is_reported_not_failed() -> None:
    comparison = compare({"c": Measurement("c", seconds=1.0)}, {"c": Measurement("c", seconds=0.5)},
                         parse_thresholds("time:+10%"))
    assert [c.verdict for c in comparison.changes] == ["improved"] and not comparison.failed


def test_cli_exits_1_on_a_10_percent_peak_regression_in_one_cell(tmp_path: Path, capsys) -> None:
    base = write(tmp_path / "base.jsonl", record("mezo", 100), record("adam", 300), record("sgd", 200))
    new = write(tmp_path / "new.jsonl", record("mezo", 110), record("adam", 300.3), record("inference", 90))
    assert main(["compare", str(base), str(new), "--fail-on", "peak:+2%,time:+10%"]) == 1
    out = capsys.readouterr().out
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in out.splitlines()
            if line.startswith("| opt-tiny")}
    assert "+10.0%" in rows[("opt-tiny/mezo/sst2/full/float32/cpu", "cpu_hwm")]
    assert "regression (> peak:+2%)" in rows[("opt-tiny/mezo/sst2/full/float32/cpu", "cpu_hwm")]
    assert "ok" in rows[("opt-tiny/adam/sst2/full/float32/cpu", "cpu_hwm")]
    # Cells on one side only are listed, not ignored.
    assert "only in base" in rows[("opt-tiny/sgd/sst2/full/float32/cpu", "cell")]
    assert "only in new" in rows[("opt-tiny/inference/sst2/full/float32/cpu", "cell")]
    assert "FAILED: 1 regression(s) in 4 cell(s)" in out and "2 cell(s) measured on one side only" in out


def test_cli_exits_0_when_every_change_is_within_thresholds(tmp_path: Path, capsys) -> None:
    base = write(tmp_path / "base.jsonl", record("mezo", 100, 0.100), record("sgd", 200))
    new = write(tmp_path / "new.jsonl", record("mezo", 101, 0.109), record("adam", 300))
    assert main(["compare", str(base), str(new), "--fail-on", "peak:+2%,time:+10%"]) == 0
    out = capsys.readouterr().out
    assert "+1.0%" in out and "+9.0%" in out and "only in base" in out and "only in new" in out
    assert "ok: 0 regression(s)" in out


def test_cli_fails_a_cell_that_ran_and_now_runs_out_of_memory(tmp_path: Path, capsys) -> None:
    base = write(tmp_path / "base.jsonl", record("adam", 300))
    new = write(tmp_path / "new.jsonl", record("adam", 0, status="oom"))
    assert main(["compare", str(base), str(new), "--fail-on", ""]) == 1
    assert "| status   | ok" in capsys.readouterr().out


def test_the_last_record_of_a_repeated_cell_is_compared_and_said_so(tmp_path: Path, capsys) -> None:
    base = write(tmp_path / "base.jsonl", record("mezo", 100))
    new = write(tmp_path / "new.jsonl", record("mezo", 150), record("mezo", 100))
    assert main(["compare", str(base), str(new)]) == 0
    assert f"note: {new} measures 1 cell(s) more than once; the last of each is compared" in capsys.readouterr().out


def test_a_corrupt_records_line_is_an_error_naming_the_line(tmp_path: Path, capsys) -> None:
    base = write(tmp_path / "base.jsonl", record("mezo", 100))
    new = tmp_path / "new.jsonl"
    new.write_text(record("mezo", 100).to_json() + "\n{not json\n")
    assert main(["compare", str(base), str(new)]) == 2
    assert f"{new}:2: corrupt record" in capsys.readouterr().err


def test_a_missing_file_is_an_error_not_a_traceback(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(tmp_path / "nope.jsonl"), str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def benchmark_file(path: Path, *benchmarks: dict) -> Path:
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": list(benchmarks)}))
    return path


def test_pytest_benchmark_files_are_matched_by_cell_and_timed_by_their_median(tmp_path: Path) -> None:
    cell = record("mezo", 100, seconds=0.5)
    suite = {"name": "test_step[mezo-sst2]", "fullname": "suites/test_step.py::test_step[mezo-sst2]",
             "extra_info": json.loads(cell.to_json()), "stats": {"median": 0.25}}
    other = {"name": "test_x", "fullname": "t.py::test_x", "extra_info": {}, "stats": {"median": 1.0}}
    run = load(benchmark_file(tmp_path / "b.json", suite, other))
    assert run.kind == "pytest-benchmark"
    assert run.measurements["opt-tiny/mezo/sst2/full/float32/cpu"] == Measurement(
        "opt-tiny/mezo/sst2/full/float32/cpu", "ok", {"cpu_hwm": 100 * MiB}, 0.25)
    assert run.measurements["t.py::test_x"] == Measurement("t.py::test_x", "ok", {}, 1.0)
    # The same cell in a records file and in a suite's JSON compare directly.
    comparison = compare(load(write(tmp_path / "r.jsonl", cell)).measurements, run.measurements)
    assert {c.cell for c in comparison.changes if c.metric == "cpu_hwm"} == {"opt-tiny/mezo/sst2/full/float32/cpu"}


def test_baseline_round_trip(tmp_path: Path) -> None:
    baseline = Baseline([Measurement("a", "ok", {"nvml": 5}, 0.1), Measurement("b", "oom")], "2026-01-01T00:00:00",
                        {"gpu": "H100"})
    baseline.save(tmp_path / "sub" / "base.json")
    assert Baseline.from_json((tmp_path / "sub" / "base.json").read_text()) == baseline
    assert load(tmp_path / "sub" / "base.json").kind == "baseline"


def test_a_baseline_of_another_schema_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"schema": 99, "measurements": []}))
    assert main(["compare", str(path), str(path)]) == 2
    assert "schema 99" in capsys.readouterr().err


def test_export_github_writes_smaller_is_better_entries_for_new(tmp_path: Path, capsys) -> None:
    base = write(tmp_path / "base.jsonl", record("mezo", 100, 0.25))
    new = write(tmp_path / "new.jsonl", record("mezo", 100, 0.25), record("adam", 0, status="oom"))
    out = tmp_path / "gh.json"
    assert main(["compare", str(base), str(new), "--export", "github", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == [
        {"name": "opt-tiny/mezo/sst2/full/float32/cpu peak cpu_hwm", "unit": "MiB", "value": 100.0},
        {"name": "opt-tiny/mezo/sst2/full/float32/cpu step time", "unit": "s", "value": 0.25},
    ]
    assert github_benchmarks([Measurement("x", "error")]) == []


def test_help_shows_the_default_thresholds(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--help"])
    assert exit_.value.code == 0
    assert "peak:+2%,time:+10%" in capsys.readouterr().out
