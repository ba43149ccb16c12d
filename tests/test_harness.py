from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zomem import harness, measure, records
from zomem.cell import Cell
from zomem.errors import UsageError
from zomem.harness import run_cell

FAULTS = Path(__file__).parent / "faults"
SPEC_FIELDS = {"schema", "model", "optimizer", "workload", "tuning", "dtype", "device", "batch_size", "seq_len",
               "params", "trainable_params", "status", "error", "peak_bytes", "breakdown", "step_seconds",
               "phases", "forwards_per_step", "hparams", "env", "time"}


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FAULTS))
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))


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


def test_timeout_is_an_error_record() -> None:
    record = run_cell(Cell("opt-tiny", "mezo", "sst2", device="cpu"), timeout=0.5)
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
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: calls.append(("cap", fraction, str(device))))
    monkeypatch.setattr(measure, "environment", lambda device: {})
    monkeypatch.setattr(measure.models, "build", lambda *args: (_ for _ in ()).throw(_Built()))
    with pytest.raises(_Built):
        measure.prepare(Cell("opt-tiny", "mezo", "sst2", device="cuda", memory_cap_bytes=20 * 2**30))
    assert calls == [("probes", "cuda:0"), "baseline", ("set_device", 0), ("cap", 0.25, "cuda:0")]


@pytest.mark.parametrize("error,oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
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
