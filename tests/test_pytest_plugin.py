"""Tests for zomem's pytest plugin, each running an inner pytest session with pytester.

The inner sessions run in this process; the cells they measure still run in child processes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import zomem.harness  # noqa: F401 - imported before pytester snapshots sys.modules, so inner sessions share it
from zomem import optim, workloads
from zomem.cell import Cell
from zomem.compare import Baseline
from zomem.measure import prepare
from zomem.pytest import fixture
from zomem.pytest.plugin import parse_names, parse_rounds, parse_warmup

pytest_plugins = ["pytester"]

SUITE = Path(__file__).resolve().parents[1] / "suites" / "test_step.py"
TINY = ("--zomem-model", "opt-tiny", "--zomem-device", "cpu")
CELL = "opt-tiny/mezo/sst2/full/float32/cpu"
GiB = 2**30

#: Measures the cell once for real, then replays that record with its peaks scaled by $ZOMEM_INFLATE:
#: a regression of exactly that size in the measured cell, free of run-to-run noise.
INFLATING_CONFTEST = '''
import json, os, pathlib
import pytest
from zomem import harness
from zomem.records import Record

MEASURED = pathlib.Path(__file__).with_name("measured.json")
real_run_cell = harness.run_cell

@pytest.fixture(autouse=True)
def inflate(monkeypatch):
    def run_cell(cell, *args, **kwargs):
        if not MEASURED.exists():
            MEASURED.write_text(real_run_cell(cell, *args, **kwargs).to_json())
        record = Record.from_dict(json.loads(MEASURED.read_text()))
        factor = float(os.environ["ZOMEM_INFLATE"])
        record.peak_bytes = {probe: round(peak * factor) for probe, peak in record.peak_bytes.items()}
        return record
    monkeypatch.setattr(harness, "run_cell", run_cell)
'''

#: Stands in for the measuring child: a record with status $FAKE_STATUS and a made-up peak.
FAKE_CHILD_CONFTEST = '''
import os
import pytest
from zomem import harness
from zomem.measure import record_for

ERRORS = {"ok": None, "oom": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
          "error": "child failed with exit status 1\\nValueError: the optimizer diverged"}

@pytest.fixture(autouse=True)
def fake_child(monkeypatch):
    def run_cell(cell, *args, **kwargs):
        status = os.environ["FAKE_STATUS"]
        ok = status == "ok"
        return record_for(cell.validated(), status=status, error=ERRORS[status],
                          peak_bytes={"cpu_hwm": 123 * 2**20} if ok else {}, forwards_per_step=2.0 if ok else None)
    monkeypatch.setattr(harness, "run_cell", run_cell)
'''


@pytest.fixture(scope="module", autouse=True)
def _warm_steps() -> None:
    # A first step imports modules lazily; they must load before pytester snapshots sys.modules, or each
    # inner session would import them again.
    for optimizer in ("mezo", "adam"):
        prepare(Cell("opt-tiny", optimizer, "sst2", device="cpu")).step()


def test_parse_names_keeps_custom_workloads_whole() -> None:
    assert parse_names("mezo, adam") == ("mezo", "adam")
    assert parse_names("sst2,custom:batch=2,seq=16,copa") == ("sst2", "custom:batch=2,seq=16", "copa")
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated"):
        parse_names(" , ")


def test_parse_rounds_and_warmup() -> None:
    assert (parse_rounds("3"), parse_warmup("0")) == (3, 0)
    for parse, text in ((parse_rounds, "0"), (parse_warmup, "-1"), (parse_rounds, "many")):
        with pytest.raises(argparse.ArgumentTypeError, match="whole number"):
            parse(text)


def test_cuda_rounds_end_with_a_sync_and_tests_end_with_an_emptied_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: the CUDA calls are recorded instead of made.
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", str(device))))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    for device in (torch.device("cpu"), torch.device("cuda", 1)):
        fixture._synchronizer(device)()
        fixture._release(device)
    assert calls == [("synchronize", "cuda:1"), ("empty_cache",)]


def test_default_grid_is_every_registered_optimizer_and_workload_the_model_takes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_cell(zomem_cell):\n    pass\n")
    result = pytester.runpytest("--collect-only", "-q", *TINY)
    assert result.ret == 0
    ids = [line for line in result.outlines if "::test_cell[" in line]
    taken = [w for w in workloads.WORKLOADS.names() if workloads.get(w).seq_len <= 2048]  # opt-tiny's positions
    assert "long4096" not in taken
    expected = [f"{o}-{w}" for o in optim.OPTIMIZERS.names() for w in taken]
    assert [line.split("[", 1)[1].rstrip("]") for line in ids] == expected


def test_grid_options_narrow_the_grid(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_cell(zomem_cell):\n"
                        "    assert (zomem_cell.dtype, zomem_cell.tuning) == ('bfloat16', 'lora')\n"
                        "    assert (zomem_cell.steps, zomem_cell.warmup) == (2, 0)\n")
    result = pytester.runpytest("-v", *TINY, "--zomem-optimizers", "mezo,adam", "--zomem-dtype", "bfloat16",
                                "--zomem-tuning", "lora",
                                "--zomem-workloads", "sst2,custom:batch=2,seq=16", "--zomem-rounds", "2",
                                "--zomem-warmup", "0")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_cell?mezo-sst2? PASSED*", "*test_cell?adam-custom:batch=2,seq=16? PASSED*"])


def test_checkpointing_applies_to_the_grids_first_order_methods(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_cell(zomem_cell):\n"
                        "    assert zomem_cell.checkpointing == (zomem_cell.optimizer == 'adam')\n")
    result = pytester.runpytest(*TINY, "--zomem-optimizers", "mezo,adam", "--zomem-workloads", "sst2",
                                "--zomem-checkpointing")
    result.assert_outcomes(passed=2)


def test_a_two_rank_suite_cell_is_measured_and_timed_by_its_ranks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_step=SUITE.read_text())
    result = pytester.runpytest(*TINY, "--zomem-optimizers", "mezo", "--zomem-workloads", "sst2", "--zomem-rounds",
                                "2", "--zomem-ranks", "2", "--zomem-save", "base")
    result.assert_outcomes(passed=1)
    [measured] = Baseline.from_json((pytester.path / ".benchmarks/zomem/base.json").read_text()).measurements
    assert measured.name.startswith("opt-tiny/mezo [fsdp x2]/sst2") and measured.seconds > 0


def test_an_unknown_name_stops_the_run_before_anything_is_built(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_cell(zomem_cell):\n    pass\n")
    result = pytester.runpytest(*TINY, "--zomem-optimizers", "meso")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting*", "zomem grid: unknown optimizer 'meso'. Did you mean mezo?*"])


def test_zomem_limit_fails_a_measured_cell_over_its_limit_and_passes_one_under(pytester: pytest.Pytester) -> None:
    pytester.makepyfile('''
        import pytest
        from zomem.cell import Cell

        CELL = Cell("opt-tiny", "inference", "sst2", device="cpu", steps=1, warmup=0)

        @pytest.mark.zomem_limit("64 MiB")
        def test_over(zomem):
            zomem.measure(CELL)

        @pytest.mark.zomem_limit("16 GiB", probe="cpu_hwm")
        def test_under(zomem):
            assert zomem.measure(CELL).status == "ok"
    ''')
    result = pytester.runpytest("-rf")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*zomem_limit 64.0 MiB (every probe): opt-tiny/inference/sst2/full/float32/cpu: cpu_hwm peak * MiB "
        "exceeds the limit",
        "*- zomem_limit -*",
        "*measured peaks:*",
        "FAILED test_zomem_limit_fails_a_measured_cell_over_its_limit_and_passes_one_under.py::test_over*",
    ])


def test_zomem_limit_reads_the_named_probe_only(pytester: pytest.Pytester) -> None:
    # GPU peaks reported by hand: the marker needs no GPU to be checked.
    pytester.makepyfile(f'''
        import pytest

        GPU = {{"torch_allocated": 4 * {GiB}, "torch_reserved": 5 * {GiB}}}

        @pytest.mark.zomem_limit("6 GiB", probe="nvml")
        def test_nvml_under(zomem):
            zomem.report_peaks({{**GPU, "nvml": 5.5 * {GiB}}})

        @pytest.mark.zomem_limit("6 GiB", probe="nvml")
        def test_nvml_over(zomem):
            zomem.report_peaks({{**GPU, "nvml": 6.5 * {GiB}}})

        @pytest.mark.zomem_limit("4.5 GiB")
        def test_every_probe(zomem):
            zomem.report_peaks({{**GPU, "nvml": 4 * {GiB}}})

        @pytest.mark.zomem_limit("6 GiB", probe="nvml")
        def test_probe_not_measured(zomem):
            zomem.report_peaks({{"cpu_hwm": 1}})

        @pytest.mark.zomem_limit("6 GiB")
        def test_nothing_measured():
            pass

        @pytest.mark.zomem_limit("6 GiB")
        def test_no_probe_measured(zomem):
            zomem.report_peaks({{}})

        @pytest.mark.zomem_limit("1 GiB")
        def test_own_failure_comes_first(zomem):
            zomem.report_peaks({{"cpu_hwm": 2 * {GiB}}})
            assert False, "the test's own failure"

        @pytest.mark.zomem_limit("lots")
        def test_bad_limit():
            pass

        @pytest.mark.zomem_limit("1 GiB", probe="vram")
        def test_unknown_probe():
            pass
    ''')
    result = pytester.runpytest("-rfE")
    result.assert_outcomes(passed=1, failed=6, errors=2)
    result.stdout.fnmatch_lines_random([
        "*zomem_limit 6,144.0 MiB (nvml): *::test_nvml_over: nvml peak 6,656.0 MiB exceeds the limit",
        "*zomem_limit 4,608.0 MiB (every probe): *::test_every_probe: torch_reserved peak 5,120.0 MiB exceeds*",
        "*::test_probe_not_measured: probe nvml was not measured (measured: cpu_hwm)",
        "*::test_no_probe_measured: probe any was not measured (measured: none)",
        "*zomem_limit 6,144.0 MiB (every probe): the test measured no peak: measure through the zomem fixture*",
        "*AssertionError: the test's own failure",
        "*bad zomem_limit marker: cannot read 'lots' as a size*",
        "*bad zomem_limit marker: unknown probe 'vram'*",
    ])


def test_suite_json_carries_memory_and_a_10_percent_regression_fails_the_session(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(INFLATING_CONFTEST)
    pytester.makepyfile(test_step=SUITE.read_text())
    one_cell = (*TINY, "--zomem-optimizers", "mezo", "--zomem-workloads", "sst2", "--zomem-rounds", "2")

    monkeypatch.setenv("ZOMEM_INFLATE", "1")
    saved = pytester.runpytest(*one_cell, "--benchmark-json", "out.json", "--zomem-save", "base")
    saved.assert_outcomes(passed=1)
    saved.stdout.fnmatch_lines(["saved 1 measurement(s) to .benchmarks/zomem/base.json"])
    benchmarks = json.loads((pytester.path / "out.json").read_text())["benchmarks"]
    assert len(benchmarks) == 1
    for bench in benchmarks:
        extra = bench["extra_info"]
        assert extra["peak_bytes"]["cpu_hwm"] > 0 and extra["forwards_per_step"] == 2
        assert set(extra["breakdown"]) >= {"weights", "optimizer_state", "gradients", "transient"}
    baseline = Baseline.from_json((pytester.path / ".benchmarks/zomem/base.json").read_text())
    [measured] = baseline.measurements
    assert measured.name == CELL and measured.seconds == benchmarks[0]["stats"]["median"]
    assert measured.peak_bytes == benchmarks[0]["extra_info"]["peak_bytes"]

    monkeypatch.setenv("ZOMEM_INFLATE", "1.10")
    regressed = pytester.runpytest(*one_cell, "--zomem-compare", "base", "--zomem-fail", "peak:+2%")
    assert regressed.ret == pytest.ExitCode.TESTS_FAILED
    regressed.assert_outcomes(passed=1)
    regressed.stdout.fnmatch_lines([
        "*- zomem memory baseline -*",
        "compared with .benchmarks/zomem/base.json (baseline)",
        "| cell *| metric *| base *| new *| change *| verdict *|",
        f"| {CELL} | cpu_hwm  | * MiB | * MiB | +10.0%   | regression (> peak:+2%) |",
        f"| {CELL} | time     | *| unchecked *|",
        "FAILED: 1 regression(s) in 1 cell(s) (thresholds: peak:+2%)",
    ])

    monkeypatch.setenv("ZOMEM_INFLATE", "1.01")
    within = pytester.runpytest(*one_cell, "--zomem-compare", "base", "--zomem-fail", "peak:+2%")
    assert within.ret == pytest.ExitCode.OK
    within.stdout.fnmatch_lines([f"| {CELL} | cpu_hwm  | * | +1.0%    | ok *|",
                                 "ok: 0 regression(s) in 1 cell(s) (thresholds: peak:+2%)"])


def test_a_cell_that_runs_out_of_memory_is_skipped_and_saved_as_oom(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(FAKE_CHILD_CONFTEST)
    pytester.makepyfile(test_step=SUITE.read_text())
    monkeypatch.setenv("FAKE_STATUS", "oom")
    result = pytester.runpytest("-rs", *TINY, "--zomem-optimizers", "adam", "--zomem-workloads", "sst2",
                                "--zomem-save", "base")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * opt-tiny/adam/sst2/full/float32/cpu: out of memory: "
                                 "OutOfMemoryError: CUDA out of memory*"])
    [measured] = Baseline.from_json((pytester.path / ".benchmarks/zomem/base.json").read_text()).measurements
    assert (measured.name, measured.status) == ("opt-tiny/adam/sst2/full/float32/cpu", "oom")


def test_a_failed_child_fails_the_test_with_its_error(pytester: pytest.Pytester,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(FAKE_CHILD_CONFTEST)
    pytester.makepyfile(test_step=SUITE.read_text())
    monkeypatch.setenv("FAKE_STATUS", "error")
    result = pytester.runpytest(*TINY, "--zomem-optimizers", "mezo", "--zomem-workloads", "sst2")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the measuring child failed: child failed with exit status 1",
                                 "ValueError: the optimizer diverged"])


def test_disabled_benchmarks_save_peaks_without_a_time(pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(FAKE_CHILD_CONFTEST)
    pytester.makepyfile(test_step=SUITE.read_text())
    monkeypatch.setenv("FAKE_STATUS", "ok")
    result = pytester.runpytest(*TINY, "--zomem-optimizers", "mezo", "--zomem-workloads", "sst2",
                                "--benchmark-disable", "--zomem-save", "base")
    result.assert_outcomes(passed=1)
    [measured] = Baseline.from_json((pytester.path / ".benchmarks/zomem/base.json").read_text()).measurements
    assert measured.peak_bytes == {"cpu_hwm": 123 * 2**20} and measured.seconds is None


def test_a_run_that_measured_nothing_leaves_the_baseline_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest("--zomem-save", "base")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["nothing measured: .benchmarks/zomem/base.json left as it was"])
    assert not (pytester.path / ".benchmarks" / "zomem").exists()


@pytest.mark.parametrize("args,message", [
    (("--zomem-fail", "peak:+2%"), "*--zomem-fail needs --zomem-compare NAME*"),
    (("--zomem-compare", "nope"), "*no baseline at .benchmarks/zomem/nope.json; save one first with "
                                  "--zomem-save nope*"),
    (("--zomem-fail", "peak:2"), "*argument --zomem-fail: cannot read threshold 'peak:2'*"),
])
def test_baseline_options_misused_are_usage_errors(pytester: pytest.Pytester, args: tuple[str, ...],
                                                   message: str) -> None:
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
