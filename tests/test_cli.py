import os
import subprocess
import sys
from pathlib import Path

import pytest

from zomem import models, records
from zomem.cli import main

PARAMS_125M = 125_239_296
LARGEST_TENSOR_125M = 50272 * 768 * 4  # the tied token embedding, float32


@pytest.fixture(scope="module")
def opt125m_sst2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, records.Record]:
    """inference, mezo and adam on opt-125m sst2, each measured by `zomem run` as a user would (the command in this
    process, each cell in its own child)."""
    out = tmp_path_factory.mktemp("run") / "records.jsonl"
    for optimizer in ("inference", "mezo", "adam"):
        assert main(["run", "--model", "opt-125m", "--optimizer", optimizer, "--workload", "sst2", "--device", "cpu",
                     "--steps", "3", "--out", str(out)]) == 0
    return {r.optimizer: r for r in records.read(out)}


def test_run_appends_a_complete_ok_record_per_optimizer(opt125m_sst2: dict[str, records.Record]) -> None:
    assert set(opt125m_sst2) == {"inference", "mezo", "adam"}
    for record in opt125m_sst2.values():
        assert record.status == "ok" and record.error is None
        assert record.params == record.trainable_params == PARAMS_125M
        assert (record.batch_size, record.seq_len, record.dtype, record.device) == (16, 64, "float32", "cpu")
        assert record.peak_bytes["cpu_hwm"] > 0 and record.step_seconds["n"] == 3
    assert opt125m_sst2["mezo"].forwards_per_step == 2 and opt125m_sst2["inference"].forwards_per_step == 1


def test_memory_is_physically_sensible(opt125m_sst2: dict[str, records.Record]) -> None:
    peak = {name: r.peak_bytes["cpu_hwm"] for name, r in opt125m_sst2.items()}
    weights = opt125m_sst2["adam"].breakdown["weights"]
    assert weights == PARAMS_125M * 4
    # MeZO's only extra memory is z, one block at a time: at most one tensor's worth over the forward floor.
    assert peak["mezo"] - peak["inference"] <= 1.1 * LARGEST_TENSOR_125M
    # Adam keeps gradients and two moments: at least three copies of the weights over the floor.
    assert peak["adam"] - peak["inference"] >= 3 * weights
    assert opt125m_sst2["adam"].breakdown["optimizer_state"] == pytest.approx(2 * weights, rel=0.01)
    assert opt125m_sst2["mezo"].breakdown["optimizer_state"] == 0


@pytest.mark.parametrize("argv,names", [
    (["run", "--model", "opt-999m", "--optimizer", "mezo", "--workload", "sst2"], "opt-125m, opt-350m"),
    (["run", "--model", "opt-tiny", "--optimizer", "meso", "--workload", "sst2"], "inference, mezo"),
    (["run", "--model", "opt-tiny", "--optimizer", "mezo", "--workload", "sst3"], "sst2, copa, squad"),
])
def test_unknown_names_exit_2_listing_valid_names(argv: list[str], names: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Valid: " in err and names in err and "Did you mean" in err


def test_too_long_sequence_is_refused_without_a_traceback(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    child = subprocess.run([sys.executable, "-m", "zomem", "run", "--model", "opt-tiny", "--optimizer", "mezo",
                            "--workload", "custom:batch=1,seq=2049", "--device", "cpu", "--out", str(out)],
                           capture_output=True, text=True)
    assert child.returncode == 2
    assert "2048 positions" in child.stderr and "Traceback" not in child.stderr
    assert not out.exists()


def test_bad_hparam_is_a_usage_error(capsys, tmp_path: Path) -> None:
    assert main(["run", "--model", "opt-tiny", "--optimizer", "mezo", "--workload", "sst2", "--device", "cpu",
                 "--hparam", "eps=-1", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "invalid eps" in capsys.readouterr().err


def test_a_hyper_parameter_of_the_wrong_type_is_named_with_the_type_it_takes(capsys, tmp_path: Path) -> None:
    assert main(["run", "--model", "opt-tiny", "--optimizer", "mezo", "--workload", "sst2", "--device", "cpu",
                 "--hparam", "lr=abc", "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "hyper-parameter lr takes a number, got 'abc' (text)" in err and "not supported between" not in err
    assert not (tmp_path / "r.jsonl").exists()


def test_overhead_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["overhead", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model MODEL the model whose MeZO step is timed" in out
    assert "--workload WORKLOAD the batch the forwards run on" in out


def test_list_names_every_registry(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in [*models.MODELS.names(), "mezo", "adam", "multirc", "custom:"])


def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line, as `zomem list | head -0` would
    try:
        child = subprocess.run([sys.executable, "-m", "zomem", "list"], stdout=write_end, stderr=subprocess.PIPE,
                               text=True, timeout=60)
    finally:
        os.close(write_end)
    assert child.returncode == 141 and child.stderr == ""
