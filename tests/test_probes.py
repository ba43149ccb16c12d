"""Tests for zomem.probes: memory probes against known allocations and a fake NVML, and the timers."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fakes import FakeNvml
from zomem.probes import (
    NVML_INTERVAL_S,
    UNAVAILABLE,
    WARNING,
    CpuHwm,
    Nvml,
    NvmlUnavailable,
    PhaseTimer,
    StepTimer,
    TorchAllocated,
    TorchReserved,
    probe_methods,
    probes_for,
    summarize,
)

MiB = 1 << 20
GiB = 1 << 30
SAMPLER = "zomem-probe-sampler"


def _clear_refs_writable() -> bool:
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
    except OSError:
        return False
    os.close(fd)
    return True


needs_clear_refs = pytest.mark.skipif(not _clear_refs_writable(), reason="/proc/self/clear_refs is not writable here")


@pytest.fixture(params=["clear_refs", "psutil"])
def cpu_probe(request: pytest.FixtureRequest, tmp_path: Path) -> CpuHwm:
    if request.param == "clear_refs":
        if not _clear_refs_writable():
            pytest.skip("/proc/self/clear_refs is not writable here")
        return CpuHwm()
    return CpuHwm(proc_dir=str(tmp_path))  # a folder without clear_refs forces the psutil fallback


def _allocate_and_free(nbytes: int, hold_s: float) -> None:
    block = torch.ones(nbytes // 4, dtype=torch.float32)  # ones writes every page, so all of it is resident
    time.sleep(hold_s)
    del block


def _sampler_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == SAMPLER]


@pytest.fixture(autouse=True, scope="module")
def _warm_torch() -> None:
    # Torch's first op starts its thread pool; that one-off growth must not land in a measured region.
    torch.ones(MiB).sum()


def test_cpu_hwm_measures_a_known_allocation(cpu_probe: CpuHwm) -> None:
    before = cpu_probe.reading()
    with cpu_probe:
        _allocate_and_free(256 * MiB, hold_s=0.1)
    assert cpu_probe.method in {"clear_refs", "psutil"}
    assert cpu_probe.peak_bytes is not None
    assert cpu_probe.peak_bytes - before == pytest.approx(256 * MiB, rel=0.05)


def test_cpu_hwm_method_follows_proc_dir(tmp_path: Path) -> None:
    probe = CpuHwm(proc_dir=str(tmp_path))
    with probe:
        pass
    assert probe.method == "psutil"
    assert not (tmp_path / "clear_refs").exists()


@needs_clear_refs
def test_cpu_hwm_uses_clear_refs_on_linux() -> None:
    probe = CpuHwm()
    with probe:
        pass
    assert probe.method == "clear_refs"


def test_cpu_hwm_forgets_peaks_before_the_region(cpu_probe: CpuHwm) -> None:
    _allocate_and_free(512 * MiB, hold_s=0.0)
    before = cpu_probe.reading()
    with cpu_probe:
        _allocate_and_free(16 * MiB, hold_s=0.0)
    assert cpu_probe.peak_bytes is not None
    assert cpu_probe.peak_bytes - before < 128 * MiB


def test_cpu_hwm_does_not_swallow_errors(cpu_probe: CpuHwm) -> None:
    with pytest.raises(KeyError), cpu_probe:
        raise KeyError("from the body")
    assert cpu_probe.peak_bytes is not None
    assert not _sampler_threads()


def _nvml(fake: FakeNvml, **kwargs: object) -> Nvml:
    return Nvml(0, nvml=fake, interval_s=0.001, **kwargs)  # type: ignore[arg-type]


def test_nvml_uses_the_per_process_figure_when_our_pid_is_listed() -> None:
    fake = FakeNvml(used=5 * GiB, processes={os.getpid(): 300 * MiB, 4242: 3 * GiB})
    probe = _nvml(fake, baseline_bytes=GiB)
    with probe:
        fake.processes[os.getpid()] = 700 * MiB
        time.sleep(0.02)
        fake.processes[os.getpid()] = 400 * MiB
    assert probe.method == "process"
    assert probe.peak_bytes == 700 * MiB


@pytest.mark.parametrize(
    "processes", [{4242: 3 * GiB}, {os.getpid(): None}, None],
    ids=["pid-absent", "used-memory-withheld", "process-query-refused"]
)
def test_nvml_falls_back_to_device_minus_baseline(processes: dict[int, int | None] | None) -> None:
    fake = FakeNvml(used=2 * GiB, processes=processes)
    probe = _nvml(fake, baseline_bytes=GiB)
    assert probe.reading() == 2 * GiB
    with probe:
        fake.used = 3 * GiB
    assert probe.method == "device-minus-baseline"
    assert probe.peak_bytes == 2 * GiB


def test_nvml_without_baseline_reports_device_used_and_says_so() -> None:
    fake = FakeNvml(used=2 * GiB)
    probe = _nvml(fake)
    with probe:
        pass
    assert probe.method == "device"
    assert probe.peak_bytes == 2 * GiB


def test_nvml_never_mixes_sources_within_a_region() -> None:
    fake = FakeNvml(used=2 * GiB, processes={os.getpid(): 5 * GiB})
    probe = _nvml(fake, baseline_bytes=GiB)
    with probe:
        fake.used = 4 * GiB
        del fake.processes[os.getpid()]  # the closing sample lacks the per-process figure
    assert probe.method == "device-minus-baseline"
    assert probe.peak_bytes == 3 * GiB


def test_nvml_catches_a_spike_between_boundaries() -> None:
    fake = FakeNvml(used=2 * GiB, processes={os.getpid(): 100 * MiB})
    probe = _nvml(fake, baseline_bytes=GiB)
    with probe:
        fake.used, fake.processes[os.getpid()] = 6 * GiB, 900 * MiB
        time.sleep(0.05)
        fake.used, fake.processes[os.getpid()] = 2 * GiB, 100 * MiB
    assert probe.samples > 2  # more than the two boundary samples
    assert probe.method == "process"
    assert probe.peak_bytes == 900 * MiB


def test_nvml_sampler_stops_on_exit() -> None:
    fake = FakeNvml()
    probe = _nvml(fake)
    with probe:
        assert len(_sampler_threads()) == 1
        time.sleep(0.01)
    assert not _sampler_threads()
    queries = fake.queries
    time.sleep(0.05)
    assert fake.queries == queries


def test_nvml_sampler_stops_when_the_body_raises() -> None:
    fake = FakeNvml()
    probe = _nvml(fake)
    with pytest.raises(ZeroDivisionError), probe:
        1 / 0
    assert not _sampler_threads()
    assert probe.peak_bytes == GiB


def test_nvml_exit_does_not_wait_out_the_interval() -> None:
    probe = Nvml(0, nvml=FakeNvml(), interval_s=30.0)  # type: ignore[arg-type]
    with probe:
        pass
    start_s = time.perf_counter()
    with probe:
        time.sleep(0.01)
    assert time.perf_counter() - start_s < 5.0


def test_nvml_sample_errors_surface_on_exit() -> None:
    fake = FakeNvml()
    probe = _nvml(fake)
    with pytest.raises(OSError, match="lost the GPU"), probe:
        fake.memory_error = OSError("lost the GPU")
        time.sleep(0.02)
    assert not _sampler_threads()


def test_nvml_sample_errors_do_not_mask_the_body_error() -> None:
    fake = FakeNvml()
    probe = _nvml(fake)
    with pytest.raises(MemoryError), probe:
        fake.memory_error = OSError("lost the GPU")
        raise MemoryError("out of memory")


def test_nvml_unavailable_when_init_fails() -> None:
    fake = FakeNvml()
    fake.init_error = RuntimeError("Driver Not Loaded")
    with pytest.raises(NvmlUnavailable, match="driver"):
        _nvml(fake)


def test_nvml_unavailable_when_pynvml_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(NvmlUnavailable, match="nvidia-ml-py"):
        Nvml(0)


def test_nvml_shuts_down_when_collected() -> None:
    fake = FakeNvml()
    probe = _nvml(fake)
    del probe
    gc.collect()  # the probe and its sampler refer to each other
    assert fake.shutdowns == 1


@pytest.mark.parametrize("probe_type", [TorchAllocated, TorchReserved])
def test_torch_probes_refuse_non_cuda_devices(probe_type: type[TorchAllocated | TorchReserved]) -> None:
    with pytest.raises(ValueError, match="not a CUDA device"):
        probe_type("cpu")


def test_torch_probes_reset_then_read_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4 * GiB)
    allocated, reserved = TorchAllocated("cuda:0"), TorchReserved("cuda:0")
    with allocated, reserved:
        assert calls == ["synchronize", "reset"] * 2
    assert calls[-2:] == ["synchronize", "synchronize"]
    assert (allocated.peak_bytes, reserved.peak_bytes) == (3 * GiB, 4 * GiB)


def test_probes_for_cpu() -> None:
    assert [probe.name for probe in probes_for("cpu")] == ["cpu_hwm"]


def test_probes_for_cuda_maps_to_the_nvml_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2")
    probes = probes_for("cuda:1", nvml=FakeNvml())  # type: ignore[arg-type]
    assert [probe.name for probe in probes] == ["torch_allocated", "torch_reserved", "nvml"]
    assert isinstance(probes[2], Nvml)
    assert probes[2].device_index == 2


def test_probes_for_unknown_device() -> None:
    with pytest.raises(ValueError, match="meta"):
        probes_for("meta")


def _mig_slice(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    # NVML lists whole GPUs; a MIG slice's UUID matches none of them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-4b8a1c7e-0000-5f2d-9a1e-3c1d2b7e6f00")
    monkeypatch.setattr(torch.cuda, "_raw_device_uuid_nvml", lambda: ["GPU-12345678-aaaa-bbbb-cccc-000000000000"])
    return FakeNvml()


def _no_nvml_library(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    fake.init_error = FakeNvml.NVMLError("NVML Shared Library Not Found")  # a container without the capability
    return fake


def _no_device_handle(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    fake.nvmlDeviceGetHandleByIndex = lambda index: (_ for _ in ()).throw(FakeNvml.NVMLError("No Permission"))
    return fake


@pytest.mark.parametrize("setup", [_mig_slice, _no_nvml_library, _no_device_handle])
def test_probes_for_cuda_drop_nvml_with_one_warning_where_nvml_cannot_watch_the_gpu(
        setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    active = probes_for("cuda:0", nvml=setup(monkeypatch))
    assert [probe.name for probe in active] == ["torch_allocated", "torch_reserved"]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(WARNING) and "nvml probe is dropped" in lines[0]
    assert probe_methods(torch.device("cuda", 0), active) == {"nvml": UNAVAILABLE}


def test_probe_methods_name_how_each_probe_read_and_leave_the_rest_out() -> None:
    nvml = Nvml(0, nvml=FakeNvml(processes={os.getpid(): GiB}), interval_s=0.001)  # type: ignore[arg-type]
    with nvml:
        pass
    assert probe_methods(torch.device("cuda", 0), [TorchAllocated("cuda:0"), nvml]) == {"nvml": "process"}
    assert probe_methods(torch.device("cpu"), []) == {}


def test_nvml_reads_the_cards_total_as_the_driver_reports_it() -> None:
    assert Nvml(0, nvml=FakeNvml(total=81559 * MiB)).total() == 81559 * MiB  # type: ignore[arg-type]


#: how long each NVML query of a sample takes in the fake. NVML's reference gives no latency. Public measurements of
#: the nearest driver query, cudaMemGetInfo, are 5–12 µs (pytorch/pytorch#174625, sgl-project/sglang#25225): the
#: memory query is taken at 20 µs, and the process list, which walks every process on the GPU, at 100 µs.
MEMORY_INFO_S, PROCESSES_S = 20e-6, 100e-6


def test_nvml_sampling_at_its_default_interval_costs_under_one_percent_of_a_step() -> None:
    # The sampler thread's own CPU time over a second is what it can take from a step running beside it, whether it
    # shares the step's core or holds the GIL: the fake's queries hold it while they take their time (real ones
    # release it in ctypes), so this errs high. Read from the thread's own clock, so other threads of a busy test
    # process are not counted.
    fake = FakeNvml(processes={os.getpid(): GiB}, memory_info_s=MEMORY_INFO_S, processes_s=PROCESSES_S)
    probe = Nvml(0, nvml=fake)  # type: ignore[arg-type]
    with probe:
        pass  # the thread's first start is a one-off, not the cost per second of sampling
    with probe:
        sampler = next(t for t in threading.enumerate() if t.name == "zomem-probe-sampler")
        clock = time.pthread_getcpuclockid(sampler.ident)
        cpu_s, wall_s = time.clock_gettime(clock), time.perf_counter()
        time.sleep(1.0)
        cpu_s, wall_s = time.clock_gettime(clock) - cpu_s, time.perf_counter() - wall_s
    calls_per_s = 2 * probe.samples / wall_s
    figures = (f"{calls_per_s:.0f} NVML calls/s at {NVML_INTERVAL_S * 1000:.0f} ms, "
               f"{cpu_s / probe.samples * 1e6:.0f} µs CPU per sample, {cpu_s / wall_s:.2%} of a step")
    assert probe.samples <= wall_s / NVML_INTERVAL_S + 2, figures  # the periodic ones, and one at either end
    assert cpu_s / wall_s < 0.01, figures


def test_summarize_known_samples() -> None:
    assert summarize([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median": 3.0, "iqr": 2.0, "n": 5}
    assert summarize([1.0, 2.0, 3.0, 4.0]) == {"median": 2.5, "iqr": 1.5, "n": 4}
    assert summarize([7.0]) == {"median": 7.0, "iqr": 0.0, "n": 1}


def test_summarize_refuses_no_samples() -> None:
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_step_timer_counts_steps() -> None:
    timer = StepTimer("cpu")
    for _ in range(3):
        with timer.step():
            time.sleep(0.01)
    with pytest.raises(RuntimeError), timer.step():
        raise RuntimeError("a failed step is not a step")
    assert len(timer.seconds) == 3
    assert all(seconds >= 0.009 for seconds in timer.seconds)


def test_phase_timer_does_not_double_count_nested_phases() -> None:
    timer = PhaseTimer("cpu")
    for _ in range(3):
        with timer.phase("forward"):
            time.sleep(0.02)
            with timer.phase("perturb"):
                time.sleep(0.02)
        with timer.phase("update"):
            time.sleep(0.01)
        with timer.phase("update"):
            time.sleep(0.01)
        timer.end_step()
    medians = timer.medians()
    assert set(medians) == {"forward", "update"}
    assert medians["forward"] >= 0.039  # the inner phase's time stays with the outer one
    assert medians["update"] >= 0.019  # both update phases of a step add up


def test_phase_timer_recovers_after_an_error() -> None:
    timer = PhaseTimer("cpu")
    with pytest.raises(RuntimeError), timer.phase("forward"):
        raise RuntimeError("boom")
    with timer.phase("update"):
        pass
    timer.end_step()
    assert set(timer.medians()) == {"update"}


class FakeEvent:
    """Stands in for torch.cuda.Event: records the fake stream's clock; reading one before it is synchronised fails."""

    clock_ms = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at_ms: float | None = None
        self.synchronized = False

    def record(self, stream: object) -> None:
        self.at_ms = FakeEvent.clock_ms

    def synchronize(self) -> None:
        self.synchronized = True

    def elapsed_time(self, end: FakeEvent) -> float:
        assert end.synchronized and self.at_ms is not None and end.at_ms is not None
        return end.at_ms - self.at_ms


def test_phase_timer_on_cuda_brackets_phases_with_events_and_never_synchronises_inside_a_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeEvent, "clock_ms", 0.0)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: "stream")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("a phase synchronised the device"))
    timer = PhaseTimer("cuda:0")
    for step in range(3):
        with timer.phase("perturb"):
            FakeEvent.clock_ms += 10
        with timer.phase("forward"):
            FakeEvent.clock_ms += 100 + step
            with timer.phase("perturb"):  # nested: stays with forward
                FakeEvent.clock_ms += 5
        with timer.phase("perturb"):
            FakeEvent.clock_ms += 20
        timer.end_step()
    assert timer.medians() == pytest.approx({"perturb": 0.030, "forward": 0.106})


def test_step_timer_on_cuda_synchronises_before_each_step_and_reads_events(monkeypatch: pytest.MonkeyPatch) -> None:
    synchronised: list[object] = []
    monkeypatch.setattr(FakeEvent, "clock_ms", 0.0)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: "stream")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: synchronised.append(device))
    timer = StepTimer("cuda:0")
    for ms in (40, 50):
        with timer.step():
            FakeEvent.clock_ms += ms
    assert timer.seconds == pytest.approx([0.040, 0.050])
    assert synchronised == [torch.device("cuda", 0)] * 2


@pytest.mark.gpu
@pytest.mark.parametrize("probe_type", [TorchAllocated, TorchReserved])
def test_torch_probes_measure_a_known_allocation(probe_type: type[TorchAllocated | TorchReserved]) -> None:
    torch.cuda.empty_cache()
    probe = probe_type("cuda")
    before = probe.reading()
    with probe:
        block = torch.ones(256 * MiB // 4, device="cuda")
        del block
    assert probe.peak_bytes is not None
    assert probe.peak_bytes - before == pytest.approx(256 * MiB, rel=0.05)


@pytest.mark.gpu
def test_nvml_measures_a_known_allocation() -> None:
    torch.ones(1, device="cuda")  # the CUDA context belongs to the baseline, not the region
    torch.cuda.empty_cache()
    probe = next(probe for probe in probes_for("cuda") if isinstance(probe, Nvml))
    with probe:
        pass
    idle = probe.peak_bytes
    with probe:
        block = torch.ones(256 * MiB // 4, device="cuda")
        torch.cuda.synchronize()
        time.sleep(0.05)
        del block
    torch.cuda.empty_cache()
    assert idle is not None and probe.peak_bytes is not None
    assert probe.peak_bytes - idle == pytest.approx(256 * MiB, rel=0.1)


@pytest.mark.gpu
def test_timers_on_cuda() -> None:
    steps, phases = StepTimer("cuda"), PhaseTimer("cuda")
    x = torch.randn(1024, 1024, device="cuda")
    for _ in range(3):
        with steps.step(), phases.phase("forward"):
            x = x @ x
            x = x / x.norm()
        phases.end_step()
    assert len(steps.seconds) == 3
    assert all(seconds > 0 for seconds in steps.seconds)
    assert set(phases.medians()) == {"forward"}
