"""The largest-fit search: bisection, predicted fits, measured fits on CPU (real cells) and on a GPU (fakes)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import types
from pathlib import Path

import pytest

from zomem import fit, hardware, models, records, tables
from zomem.cell import Cell
from zomem.cli import fit as fit_cli
from zomem.cli import main as cli
from zomem.errors import CellFailed, UsageError
from zomem.hardware import GIB
from zomem.measure import record_for
from zomem.records import Record, RecordsError

TEST_LADDER = [spec.name for spec in models.TEST_LADDER]


@pytest.mark.parametrize("n", range(10))
def test_search_finds_the_boundary_in_few_trials(n: int) -> None:
    for answer in range(-1, n):
        for first in (None, *range(n)):
            asked: list[int] = []
            found = fit.search(n, lambda i: asked.append(i) or i <= answer, first)
            assert found == answer
            assert len(asked) == len(set(asked))  # never the same model twice
            if first is None:
                assert len(asked) <= math.ceil(math.log2(n + 1))
            elif first == answer:
                assert len(asked) <= 2  # a right guess costs its own trial and its neighbour's


def test_predicted_fit_answers_every_default_row_quickly_with_per_model_figures() -> None:
    fit.predict(hardware.parse_row("1xA100-80GB"), "inference")  # builds the meta models once
    start = time.monotonic()
    fits = [fit.predict(hardware.parse_row(row), "mezo") for row in hardware.DEFAULT_ROWS]
    assert time.monotonic() - start < 10  # each model's forward traced once, on fake tensors
    answers = {f.hardware: f.answer for f in fits}
    assert answers["1xA100-80GB"] == "opt-30b"  # MeZO's own claim: 30B on one A100-80GB
    assert answers["8xA100-80GB"] == "opt-175b"
    for f in fits:
        assert f.source == "predicted" and f.trials
        ladder = list(fit.DEFAULT_LADDER)
        for trial in f.trials:
            assert trial.fits == (ladder.index(trial.model) <= ladder.index(f.answer))
            assert trial.peak_bytes > 0 and "per_gpu" in trial.detail


def test_the_reference_reports_largest_fit_table_is_what_the_estimator_predicts_today() -> None:
    # the committed table was written by `make report`; a change to the estimator that moves a cell must say so
    table = Path(__file__).parent.parent / "reports" / "cpu-default" / "largest_fit.csv"
    with table.open(encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if "A100" in row["hardware"] and row["source"] == "predicted"]
    assert len(rows) >= 4 * 12
    for row in rows:
        optimizer, _, checkpointing = row["optimizer"].partition(" + ")
        predicted = fit.predict(hardware.parse_row(row["hardware"]), optimizer, checkpointing=bool(checkpointing))
        assert predicted.answer == row["model"], row


def test_adam_fits_less_than_mezo_and_more_gpus_fit_more() -> None:
    ladder = list(fit.DEFAULT_LADDER)
    size = lambda row, o: ladder.index(fit.predict(hardware.parse_row(row), o).answer)  # noqa: E731
    assert size("1xA100-80GB", "adam") < size("1xA100-80GB", "mezo")
    assert size("8xV100-32GB", "adam") > size("1xV100-32GB", "adam")


def test_fit_command_prints_json_for_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["fit", "--predict", "--optimizer", "mezo", "adam", "--hardware", "1xA100-80GB", "2xV100-32GB",
                "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(d["hardware"], d["optimizer"]) for d in data] == [
        ("1xA100-80GB", "mezo"), ("1xA100-80GB", "adam"), ("2xV100-32GB", "mezo"), ("2xV100-32GB", "adam")]
    assert data[1]["precision"] == "mixed"
    assert all(t["peak_bytes"] and "fits" in t for d in data for t in d["trials"])


def test_measured_fit_on_cpu_finds_what_a_full_scan_finds(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # One forward of 8192 tokens: the test configs' logits (vocab 1024, 4096, 8192) put their peaks over
    # 100 MiB apart, far beyond run-to-run noise, in a second or two per cell.
    scan_out = tmp_path / "scan.jsonl"
    base = ["fit", "--measure", "--optimizer", "inference", "--workload", "custom:batch=32,seq=256", "--dtype",
            "float32", "--device", "cpu",
            "--records", str(scan_out), "--json"]
    peaks = []
    for model in TEST_LADDER:  # the full scan: every model's measured peak
        assert cli([*base, "--models", model, "--budget", "1TiB"]) == 0
        peaks.append(json.loads(capsys.readouterr().out)[0]["trials"][0]["peak_bytes"])
    assert peaks == sorted(peaks)
    for i in range(len(peaks) - 1):
        budget = (peaks[i] + peaks[i + 1]) // 2
        assert cli([*base, "--models", *TEST_LADDER, "--budget", str(budget)]) == 0
        found = json.loads(capsys.readouterr().out)[0]
        assert found["answer"] == TEST_LADDER[i]  # the full scan: models up to i fit, i+1 does not
        assert found["source"] == "measured" and len(found["trials"]) <= 2
    assert all(r.device == "cpu" for r in records.read(scan_out))


def fake_gpu_run(peaks: dict[str, float], capacity: int, calls: list[Cell]) -> fit.RunCell:
    """A stand-in for the harness on a GPU box: out of memory past the cap, else an nvml peak."""

    def run(cell: Cell) -> Record:
        calls.append(cell)
        assert cell.memory_cap_bytes == capacity  # the card is emulated with a per-process cap
        peak = int(peaks[cell.model] * GIB)
        if peak > capacity * 1.05:
            return record_for(cell, status="oom", error="torch.OutOfMemoryError: CUDA out of memory")
        return record_for(cell, peak_bytes={"torch_allocated": peak - GIB, "nvml": peak})

    return run


def test_measured_fit_on_a_gpu_caps_memory_and_judges_by_nvml() -> None:
    row = hardware.parse_row("1xV100-32GB")
    capacity = row.gpu.memory_bytes
    template = Cell("opt-125m", "mezo", "multirc", dtype="float16", device="cuda", steps=1)
    cell = fit.gpu_cell(row, template, device_total_bytes=80 * GIB)
    assert cell.memory_cap_bytes == capacity
    # opt-13b runs under the cap but the driver counts 32.5 GiB with the CUDA context: it does not fit
    peaks = {"opt-125m": 1, "opt-350m": 1.5, "opt-1.3b": 4, "opt-2.7b": 7, "opt-6.7b": 15, "opt-13b": 32.5,
             "opt-30b": 62, "opt-66b": 130, "opt-175b": 340}
    calls: list[Cell] = []
    result = fit.measure(cell, capacity, row.name, fake_gpu_run(peaks, capacity, calls), guess="opt-13b")
    assert result.answer == "opt-6.7b" and result.source == "measured"
    assert [c.model for c in calls] == ["opt-13b", "opt-6.7b"]
    assert {t.model: t.fits for t in result.trials} == {"opt-6.7b": True, "opt-13b": False}
    calls.clear()
    result = fit.measure(cell, capacity, row.name, fake_gpu_run(peaks, capacity, calls))
    assert result.answer == "opt-6.7b" and len(calls) <= 4
    assert any(t.detail["status"] == "oom" for t in fit.measure(
        cell, capacity, row.name, fake_gpu_run(peaks, capacity, []), guess="opt-30b").trials)


def test_a_gpu_fit_subtracts_the_driver_reserve_and_without_nvml_judges_by_reserved_plus_context() -> None:
    row = hardware.parse_row("1xV100-32GB")
    capacity, reserve, context = row.gpu.memory_bytes, GIB // 2, GIB // 4
    cell = fit.gpu_cell(row, Cell("opt-125m", "mezo", "multirc", dtype="float16", device="cuda", steps=1), None)
    # what each model's cell reserved, in GiB: opt-6.7b is under the card but not under the card less the reserve
    reserved = {"opt-1.3b": 3.5, "opt-2.7b": 6.5, "opt-6.7b": capacity / GIB - 0.5, "opt-13b": 32.0}

    def run(c: Cell) -> Record:
        return record_for(c, peak_bytes={"torch_allocated": GIB, "torch_reserved": int(reserved[c.model] * GIB)},
                          probe_methods={"nvml": "unavailable"},
                          cuda_memory={"context": context, "reserve": reserve, "cap": capacity - reserve})

    result = fit.measure(cell, capacity, row.name, run, ladder=list(reserved), guess="opt-6.7b")
    assert result.answer == "opt-2.7b"
    trials = {t.model: t for t in result.trials}
    assert trials["opt-6.7b"].peak_bytes == int(reserved["opt-6.7b"] * GIB) + context
    assert not trials["opt-6.7b"].fits and trials["opt-2.7b"].fits
    assert trials["opt-6.7b"].detail == {"status": "ok", "probe": "torch_reserved+context", "reserve": reserve}
    # a record with neither probe cannot be judged, and says so rather than counting as "does not fit"
    with pytest.raises(CellFailed, match="no nvml peak"):
        fit.judged_peak(record_for(cell, peak_bytes={"torch_allocated": GIB}), "nvml")


def test_without_nvml_the_rows_to_emulate_must_be_named() -> None:
    nvml = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(OSError("NVML Shared Library Not Found")))
    assert fit.gpu_total_bytes("cuda:0", nvml) is None
    with pytest.raises(UsageError, match="--hardware"):
        fit_cli.emulable(None)


def test_gpu_emulation_refuses_what_it_cannot_emulate() -> None:
    template = Cell("opt-125m", "mezo", "multirc", device="cuda")
    with pytest.raises(UsageError, match="needs 2 GPUs and this box has 1"):
        fit.gpu_cell(hardware.parse_row("2xV100-32GB"), template, 80 * GIB)
    with pytest.raises(UsageError, match="cannot emulate"):
        fit.gpu_cell(hardware.parse_row("1xH200-141GB"), template, 80 * GIB)


def test_several_cards_are_emulated_as_as_many_ranks_each_capped_at_a_card() -> None:
    template = Cell("opt-125m", "mezo", "multirc", device="cuda")
    cell = fit.gpu_cell(hardware.parse_row("2xV100-32GB"), template, 80 * GIB, gpus=8)
    card = hardware.parse_row("1xV100-32GB").gpu.memory_bytes
    assert (cell.ranks, cell.strategy, cell.memory_cap_bytes) == (2, "fsdp", card)
    replicated = fit.gpu_cell(hardware.parse_row("2xV100-32GB"), dataclasses.replace(template, ranks=2,
                              strategy="replicate"), 80 * GIB, gpus=2)
    assert replicated.strategy == "replicate"
    assert [r.name for r in fit_cli.emulable(80 * GIB, gpus=2)] == ["1xA100-80GB", "2xA100-80GB", "1xV100-32GB",
                                                                     "2xV100-32GB"]


def test_a_measured_fit_runs_the_precision_a_prediction_assumes() -> None:
    assert fit.template("opt-tiny", "adam", "multirc", "float16", None, "cpu").precision == "mixed"
    assert fit.template("opt-tiny", "mezo", "multirc", "float16", None, "cpu").precision == "pure"
    assert fit.template("opt-tiny", "adam", "multirc", "bfloat16", "pure", "cpu").precision == "pure"
    with pytest.raises(UsageError, match="not a half dtype"):
        fit.template("opt-tiny", "adam", "multirc", "float32", "mixed", "cpu")


def test_measured_fit_in_mixed_precision_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trials.jsonl"
    assert cli(["fit", "--measure", "--optimizer", "adam", "--workload", "sst2", "--dtype", "bfloat16", "--precision",
                "mixed", "--device", "cpu", "--models", "opt-tiny", "opt-mini", "--budget", "1TiB", "--records",
                str(out), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)[0]
    assert found["answer"] == "opt-mini" and found["precision"] == "mixed"
    assert {(r.precision, r.dtype, r.status) for r in records.read(out)} == {("mixed", "bfloat16", "ok")}


def test_a_two_rank_fit_search_on_cpu_runs_end_to_end_and_its_row_reads_measured(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, fits = tmp_path / "trials.jsonl", tmp_path / "fits.jsonl"
    assert cli(["fit", "--measure", "--ranks", "2", "--optimizer", "mezo", "--workload", "sst2", "--device", "cpu",
                "--models", "opt-tiny", "opt-mini", "--budget", "1TiB", "--records", str(out), "--out", str(fits),
                "--json"]) == 0
    found = json.loads(capsys.readouterr().out)[0]
    assert found["answer"] == "opt-mini" and (found["ranks"], found["strategy"]) == (2, "fsdp")
    assert found["hardware"] == "cpu budget 1.02e+03 GiB x2 ranks"
    trials = records.read(out)
    assert trials and all(r.status == "ok" and len(r.rank_peak_bytes) == 2 for r in trials)
    # a measured fit of two cards (as a 2-GPU box writes it) is what the largest-fit table marks measured
    measured = dataclasses.replace(fit.read(fits, "sst2", "float16")[0], hardware="2xA100-80GB")
    predicted = fit.predict(hardware.parse_row("1xA100-80GB"), "mezo", "sst2", "float16")
    table = tables.largest_fit([measured, predicted], ["1xA100-80GB", "2xA100-80GB"], ["mezo"])
    assert table.rows == [["1xA100-80GB", f"{predicted.answer} (p)"], ["2xA100-80GB", "opt-mini (m)"]]
    assert "fsdp x2" in table.markdown()


def test_a_crashed_trial_stops_the_search_instead_of_counting_as_too_big() -> None:
    template = Cell("opt-125m", "mezo", "multirc", dtype="float16", device="cuda", steps=1)
    crashed = lambda cell: record_for(cell, status="error", error="Traceback …\nValueError: bad kernel")  # noqa: E731
    with pytest.raises(CellFailed, match="opt-13b with mezo failed, so whether it fits is unknown.*bad kernel"):
        fit.measure(template, 32 * GIB, "1xV100-32GB", crashed, guess="opt-13b")


def test_measuring_without_rows_emulates_the_default_cards_this_gpu_can_hold() -> None:
    assert [r.name for r in fit_cli.emulable(80 * GIB)] == ["1xA100-80GB", "1xV100-32GB"]
    assert [r.name for r in fit_cli.emulable(81559 * 2**20)] == ["1xV100-32GB"]  # an H100 as its driver reports it
    with pytest.raises(UsageError, match="can emulate none of the default rows"):
        fit_cli.emulable(24 * GIB)


def test_gpu_memory_is_read_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    seen: list[object] = []
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: seen.append("init"), nvmlShutdown=lambda: seen.append("shutdown"),
        nvmlDeviceGetHandleByIndex=lambda index: seen.append(index) or index,
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(total=40 * GIB))
    assert fit.gpu_total_bytes("cuda:1", nvml) == 40 * GIB
    assert seen == ["init", 5, "shutdown"]  # CUDA's device 1 is NVML's device 5


def test_fits_round_trip_and_a_corrupt_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fits.jsonl"
    result = fit.Fit("1xV100-32GB", "mezo", "multirc", "float16", "pure", "measured", 7, "opt-13b",
                     [fit.Trial("opt-13b", 5, True, {"status": "ok"})])
    fit.append(path, result)
    fit.append(path, dataclasses.replace(result, dtype="float32"))
    assert fit.read(path, "multirc", "float16") == [result]
    with path.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(RecordsError, match=r"fits.jsonl:3"):
        fit.read(path, "multirc", "float16")
