"""The prepared GPU check's own logic, with its steps replaced by tiny commands: which exits fail it, what it writes
and packs, and its one-line refusal without a GPU (the whole check on CPU is `make gpu-check DEVICE=cpu`, which
`make test` runs)."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from zomem import calibrate, gpucheck
from zomem.cli import main as cli
from zomem.estimate import Calibration


def exits(code: int) -> list[str]:
    return [sys.executable, "-c", f"print('step output'); raise SystemExit({code})"]


@pytest.fixture
def fitted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate calibration however few records the fake steps wrote."""
    monkeypatch.setattr(calibrate, "fit", lambda found, kind, source="": Calibration(kind, True, 0, cells=0))


@pytest.mark.parametrize(("finished", "code", "status"), [((0,), 0, 0), ((0, 1), 1, 0), ((0,), 1, 1)])
def test_a_step_fails_the_check_only_with_an_exit_it_does_not_count_as_finished(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fitted: None, finished: tuple[int, ...], code: int,
        status: int) -> None:
    monkeypatch.setattr(gpucheck, "steps", lambda plan, out: [gpucheck.Step("probe", exits(code), 30, finished)])
    assert gpucheck.run("cpu", tmp_path / "check", None) == status
    outcomes = json.loads((tmp_path / "check" / "outcomes.json").read_text())
    assert outcomes["probe"].startswith(f"exit {code} in ")
    assert "step output" in (tmp_path / "check" / "gpu-check.log").read_text()


def test_a_check_that_cannot_fit_a_calibration_fails_and_still_packs_what_it_has(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(gpucheck, "steps", lambda plan, out: [gpucheck.Step("probe", exits(0), 30)])
    assert gpucheck.run("cpu", tmp_path / "check", tmp_path / "pack") == 1  # no records: nothing to fit
    assert json.loads((tmp_path / "check" / "outcomes.json").read_text())["calibrate"].startswith("not fitted")
    with tarfile.open(tmp_path / "pack" / "gpu-check-cpu.tar.gz") as tar:
        assert "gpu-check-cpu/comparison.md" in tar.getnames()
    assert (tmp_path / "pack" / "gpu-check.log").exists()


def test_steps_past_the_runs_deadline_are_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  fitted: None) -> None:
    monkeypatch.setattr(gpucheck.Plan, "for_device", classmethod(
        lambda cls, device: cls(device, "opt-tiny", ("opt-tiny",), ("--budget", "1GiB"), 0, 1024)))
    monkeypatch.setattr(gpucheck, "steps", lambda plan, out: [gpucheck.Step("probe", exits(0), 30)])
    assert gpucheck.run("cpu", tmp_path / "check", None) == 1
    assert json.loads((tmp_path / "check" / "outcomes.json").read_text())["probe"] == "skipped: out of time"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_without_a_gpu_the_check_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["gpu-check", "--out", str(tmp_path / "check")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err
    assert not (tmp_path / "check").exists()
