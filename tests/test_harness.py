import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fakes import FakeCuda, FakeNvml, fake_cuda
from processes import gone, measuring_child
from zomem import fit, hardware, harness, measure, records
from zomem.cell import Cell
from zomem.errors import UsageError
from zomem.harness import run_cell
from zomem.probes import WARNING

MiB, GiB = 1 << 20, 1 << 30

SPEC_FIELDS = {"schema", "model", "optimizer", "workload", "tuning", "dtype", "device", "batch_size", "seq_len",
               "params", "trainable_params", "status", "error", "peak_bytes", "breakdown", "step_seconds",
               "phases", "forwards_per_step", "hparams", "env", "time"}


def test_cell_runs_in_a_child_and_appends_a_full_record(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    record = run_cell(Cell("opt-tiny", "mezo", "copa", device="cpu", steps=2), out=out)
    assert record.status == "ok" and records.read(out) == [record]
    data = records.json.loads(record.to_json())
    assert SPEC_FIELDS <= data.keys()
    assert {"weights", "optimizer_state", "gradients", "transient"} <= record.breakdown.keys()
    assert record.step_seconds["n"] == 2 and record.forwards_per_step == 2
    assert {"perturb", "forward", "update"} <= record.phases.keys()
    assert {"python", "torch", "transformers", "zomem", "git_commit", "cpu", "gpu", "driver",
            "gpu_total_bytes"} <= record.env.keys()
    assert record.peak_bytes["cpu_hwm"] > record.baseline_bytes["cpu_hwm"]
    assert record.probe_methods["cpu_hwm"] in {"clear_refs", "psutil"}
    # The parent only ever asked NVML about CUDA.
    assert not torch.cuda.is_initialized()


def test_out_of_memory_becomes_an_oom_record(tmp_path: Path, faults: None) -> None:
    record = run_cell(Cell("opt-tiny", "zomem_faults:OutOfMemory", "sst2", device="cpu"), out=tmp_path / "r")
    assert record.status == "oom" and "out of memory" in record.error


def test_crash_becomes_an_error_record_with_the_stderr_tail(tmp_path: Path, faults: None) -> None:
    record = run_cell(Cell("opt-tiny", "zomem_faults:Crashes", "sst2", device="cpu"), out=tmp_path / "r")
    assert record.status == "error"
    assert "RuntimeError: boom" in record.error and "the tail of stderr" in record.error


def test_killed_child_is_recorded_as_oom(tmp_path: Path, faults: None) -> None:
    record = run_cell(Cell("opt-tiny", "zomem_faults:KilledByKernel", "sst2", device="cpu"), out=tmp_path / "r")
    assert record.status == "oom" and "SIGKILL" in record.error


def test_timeout_is_an_error_record(tmp_path: Path, faults: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # a step that sleeps: an opt-tiny cell itself may finish inside any timeout short enough for a test
    monkeypatch.setenv("ZOMEM_FAULT_MARK", str(tmp_path / "in-flight"))
    record = run_cell(Cell("opt-tiny", "zomem_faults:Sleeps", "sst2", device="cpu"), timeout=2)
    assert record.status == "error" and "timed out" in record.error


@pytest.mark.parametrize("cell,message", [
    (Cell("opt-tiny", "mezo", "custom:batch=1,seq=4096", device="cpu"), "2048 positions"),
    (Cell("opt-tiny", "mezo", "sst2", device="tpu"), "unknown device"),
    (Cell("opt-tiny", "mezo", "sst2", dtype="float8"), "unknown dtype"),
    (Cell("opt-tiny", "mezo", "sst2", tuning="ia3"), "unknown tuning"),
    (Cell("opt-tiny", "mezo", "sst2", steps=0), "steps >= 1"),
])
def test_bad_cells_are_refused_before_a_child_starts(cell: Cell, message: str, monkeypatch) -> None:
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("a child was started"))
    with pytest.raises(UsageError, match=message):
        run_cell(cell)


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("zomem.cell.cuda_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        Cell("opt-tiny", "mezo", "sst2", device="cuda").validated()
    assert Cell("opt-tiny", "mezo", "sst2").validated().device == "cpu"


def test_a_bare_cuda_device_is_given_the_index_torch_cuda_setters_demand() -> None:
    device = measure.torch_device("cuda")
    assert device == torch.device("cuda", 0)
    assert torch.cuda._utils._get_device_index(device) == 0  # what set_device and the memory cap call
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda._utils._get_device_index(torch.device("cuda"))
    assert measure.torch_device("cuda:2") == torch.device("cuda", 2) and measure.torch_device("cpu").index is None


class _Built(Exception):
    """Raised where the model would be built: the CUDA set-up before it is what the test looks at."""


def test_a_cuda_cell_reads_its_baselines_before_its_first_cuda_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    class Probe:
        name = "nvml"

        def reading(self) -> int:
            calls.append("baseline")
            return 0

    def set_device(device: torch.device) -> None:
        calls.append(("set_device", torch.cuda._utils._get_device_index(device)))

    monkeypatch.setattr(measure.probes, "probes_for", lambda device: calls.append(("probes", str(device))) or [Probe()])
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: calls.append("free") or (79 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: calls.append(("cap", fraction, str(device))))
    monkeypatch.setattr(measure, "environment", lambda device: {})
    monkeypatch.setattr(measure.models, "build", lambda *args: (_ for _ in ()).throw(_Built()))
    with pytest.raises(_Built):
        measure.prepare(Cell("opt-tiny", "mezo", "sst2", device="cuda", memory_cap_bytes=20 * 2**30))
    assert calls == [("probes", "cuda:0"), "baseline", ("set_device", 0), "free", ("cap", 0.25, "cuda:0")]


@pytest.mark.parametrize("error,oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("CUDA driver error: out of memory"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_recognised_however_cuda_words_it(error: BaseException, oom: bool) -> None:
    assert measure.is_oom(error) is oom


def test_children_number_gpus_as_nvml_does_and_keep_what_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert harness._child_env()["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    assert harness._child_env()["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


@pytest.mark.parametrize("message", ["CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
                                     "CUDA driver error: out of memory"])
def test_a_cell_that_runs_out_of_memory_in_other_words_is_an_oom_that_a_fit_search_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    monkeypatch.setattr(measure, "measure",
                        lambda cell, timeline=None: (_ for _ in ()).throw(RuntimeError(message)))
    cell = Cell("opt-tiny", "mezo", "multirc", dtype="float16", device="cuda", steps=1)
    (tmp_path / "cell.json").write_text(cell.to_json())
    assert measure.main(str(tmp_path / "cell.json"), str(tmp_path / "record.json")) == 0
    record = records.Record.from_dict(records.json.loads((tmp_path / "record.json").read_text()))
    assert record.status == "oom" and message.splitlines()[0] in record.error
    # a search over the ladder reads it as "does not fit" and goes on, where an error would stop it
    assert fit.measure(cell, 32 * GiB, "1xV100-32GB", lambda c: record, ladder=["opt-125m", "opt-350m"]).answer is None


def test_a_cuda_cell_without_nvml_runs_ok_and_its_record_says_nvml_was_unavailable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    card = fake_cuda(monkeypatch, FakeCuda(total=40 * GiB, free=39 * GiB, reserved_peak=4 * GiB))
    record = measure.measure(Cell("opt-tiny", "mezo", "sst2", device="cuda", steps=2))
    assert record.status == "ok" and card.built == ["opt-tiny"]
    assert record.peak_bytes == {"torch_allocated": card.allocated_peak, "torch_reserved": 4 * GiB}
    assert record.probe_methods == {"nvml": "unavailable"}
    # without NVML, CUDA's own view: all that is in use before anything is built is this process's context
    assert record.cuda_memory == {"cuda_total": 40 * GiB, "cuda_free": 39 * GiB, "context": GiB}
    assert "the nvml probe is dropped" in capsys.readouterr().err
    assert fit.judged_peak(record, "nvml") == (5 * GiB, fit.RESERVED_AND_CONTEXT)
    # records written before the field was added still read, with nothing in it
    older = {k: v for k, v in dataclasses.asdict(record).items() if k != "cuda_memory"}
    assert records.Record.from_dict(older).cuda_memory == {}


def test_an_emulated_card_is_capped_at_its_total_less_the_reserve_this_card_measured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # an H100 as its driver reports it; CUDA is given 559 MiB less, and the context takes 500 MiB of that
    nvml = FakeNvml(used=0, processes=None, total=81559 * MiB)
    card = fake_cuda(monkeypatch, FakeCuda(total=81000 * MiB, free=80500 * MiB, context=500 * MiB), nvml)
    v100 = hardware.gpu("V100-32GB").memory_bytes
    record = measure.measure(Cell("opt-tiny", "mezo", "sst2", device="cuda", steps=1, memory_cap_bytes=v100))
    assert record.status == "ok" and "nvml" in record.peak_bytes
    assert record.cuda_memory == {"cuda_total": 81000 * MiB, "cuda_free": 80500 * MiB, "context": 500 * MiB,
                                  "nvml_total": 81559 * MiB, "reserve": 559 * MiB, "cap": v100 - 559 * MiB}
    assert card.fractions == [pytest.approx((v100 - 559 * MiB) / (81000 * MiB))]


def test_a_card_this_large_is_emulated_whole_and_a_larger_one_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(used=0, processes=None, total=81559 * MiB)
    card = fake_cuda(monkeypatch, FakeCuda(total=81000 * MiB, free=80500 * MiB, context=500 * MiB), nvml)
    h100 = hardware.gpu("H100-80GB").memory_bytes
    prepared = measure.prepare(Cell("opt-tiny", "mezo", "sst2", device="cuda", memory_cap_bytes=h100))
    assert prepared.cuda_memory["cap"] == 81000 * MiB and card.fractions == []
    # without NVML the reserve is unknown, and a card larger than what CUDA has cannot be emulated
    fake_cuda(monkeypatch, FakeCuda(total=40 * GiB, free=39 * GiB))
    with pytest.raises(UsageError, match="cannot emulate a card of 79.6 GiB"):
        measure.prepare(Cell("opt-tiny", "mezo", "sst2", device="cuda", memory_cap_bytes=h100))


def test_bfloat16_is_refused_on_a_card_older_than_ampere_before_anything_is_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("zomem.cell.cuda_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(capability=(7, 0), name="Tesla V100-SXM2-32GB"))
    with pytest.raises(UsageError, match=r"compute capability 8.0 or newer; cuda \(Tesla V100-SXM2-32GB\) is 7.0"):
        Cell("opt-tiny", "mezo", "sst2", dtype="bfloat16", device="cuda").validated()
    assert Cell("opt-tiny", "mezo", "sst2", dtype="float16", device="cuda").validated().device == "cuda"
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(capability=(8, 0)))
    assert Cell("opt-tiny", "mezo", "sst2", dtype="bfloat16", device="cuda").validated().dtype == "bfloat16"
    # where the parent had no NVML to ask, the child refuses it before building the model
    card = fake_cuda(monkeypatch, FakeCuda(capability=(7, 5)))
    with pytest.raises(UsageError, match="7.5"):
        measure.prepare(Cell("opt-tiny", "mezo", "sst2", dtype="bfloat16", device="cuda"))
    assert card.built == []


def test_a_childs_warnings_reach_the_user_once(capsys: pytest.CaptureFixture[str]) -> None:
    said = f"{WARNING}the nvml probe is dropped (test {id(capsys)})"
    harness.pass_on_warnings(f"loading…\n{said}\n")
    harness.pass_on_warnings(f"{said}\nTraceback (most recent call last):\n")
    assert capsys.readouterr().err == said + "\n"


def test_a_measuring_child_dies_with_its_parent(tmp_path: Path, faults: None) -> None:
    marker = tmp_path / "stepping"
    parent = subprocess.Popen(
        [sys.executable, "-m", "zomem", "run", "--model", "opt-tiny", "--optimizer", "zomem_faults:Sleeps",
         "--workload", "sst2", "--device", "cpu", "--out", str(tmp_path / "r.jsonl")],
        env={**os.environ, "ZOMEM_FAULT_MARK": str(marker)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child = measuring_child(parent, marker)
    finally:
        parent.kill()  # SIGKILL: the parent can clean nothing up; the kernel must end the child
        parent.wait()
    assert gone(child)
