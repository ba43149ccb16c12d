"""The child side of a cell: build the model, warm up, measure under every probe, return a record.

Run by the harness in a fresh process per cell (:func:`child`, forked from a server that has imported torch and
transformers but built nothing), so peaks, CUDA contexts and allocator caches never leak between cells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zomem import memtrack, models, optim, probes, ranks, shards, strategies, workloads
from zomem.closure import Phases, Precision, autocast_cache_bytes, make_closure, precision_for
from zomem.environment import environment, json_safe
from zomem.cell import Cell, check_bfloat16
from zomem.errors import UsageError
from zomem.hardware import GIB
from zomem.records import Record
from zomem.timelines import SNAPSHOT_FILE, TIMELINE_FILE

STDERR_TAIL = 4000


def record_for(cell: Cell, **fields: Any) -> Record:
    """A record naming ``cell``, its shape and the time, with ``fields`` filled in."""
    workload = workloads.get(cell.workload)
    return Record(
        model=cell.model, optimizer=cell.optimizer, workload=cell.workload, tuning=cell.tuning,
        dtype=cell.dtype, precision=cell.precision, checkpointing=cell.checkpointing, device=cell.device,
        ranks=cell.ranks, strategy=cell.strategy,
        batch_size=workload.batch_size, seq_len=workload.seq_len,
        candidates=workload.candidates, steps=cell.steps, warmup=cell.warmup, warmup_batch=cell.warmup_batch,
        time=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **fields,
    )


#: how out-of-memory reads where it is not torch.OutOfMemoryError: the CPU allocator, and CUDA failing outside the
#: caching allocator (a kernel's lazy loading, cuBLAS workspaces; cuBLAS reports a handle it had no memory to create
#: as NOT_INITIALIZED; the driver API words it its own way)
OOM_MESSAGES = ("can't allocate memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                "CUBLAS_STATUS_NOT_INITIALIZED", "CUDA driver error: out of memory")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory failure, on GPU or CPU."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(message in str(exc) for message in OOM_MESSAGES)


def with_other(phases: dict[str, float], steps: list[float]) -> dict[str, float]:
    """Phase medians plus ``other``: step time outside every named phase (e.g. torch's own Adam update)."""
    other = probes.summarize(steps)["median"] - sum(phases.values())
    return {**phases, "other": max(other, 0.0)}


@dataclass
class Prepared:
    """A cell built in this process and ready to step: model, batch, optimizer, closure and probes."""

    cell: Cell
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    closure: Callable[[], torch.Tensor]
    #: closure calls since the counter was last reset: forward passes
    calls: list[int]
    phases: Phases
    probes: list[probes.Probe]
    #: probe readings before the model was built
    baseline: dict[str, int]
    env: dict[str, Any]
    #: the workload this process steps on: the cell's, or a rank's share of its batch
    workload: workloads.Workload
    precision: Precision = Precision()
    #: CUDA: the card at the start and the allocator cap (see :func:`cuda_memory`)
    cuda_memory: dict[str, int] = dataclasses.field(default_factory=dict)
    #: bytes of autocast's cache of half-precision weights during a forward (mixed precision)
    autocast_cache: int = 0
    #: the optimizer's step count when the measured steps began (0: the first step)
    timed_from_step: int | None = None
    #: this process's rank, for a cell run as several processes
    rank: ranks.Rank | None = None

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One optimizer step driven by ``closure`` (default: the measured one). With a gradient scaler the
        closure runs first and the scaler steps the optimizer, skipping a step whose gradients overflowed, as
        accelerate and Hugging Face Trainer do (GradScaler takes no closure)."""
        closure = closure or self.closure
        scaler = self.precision.scaler
        if scaler is None:
            return self.optimizer.step(closure)
        loss = closure()
        scaler.step(self.optimizer)
        scaler.update()
        return loss

    def start_measuring(self) -> None:
        """After warm-up: count forwards and time phases from here on."""
        self.calls[0] = 0
        self.phases.timer = probes.PhaseTimer(self.device) if self.cell.phases else None
        self.timed_from_step = self.steps_taken()

    def steps_taken(self) -> int:
        """Steps the optimizer counts so far: a zeroth-order method's own count (which reaching its steady state
        advances), else the steps this cell ran."""
        if isinstance(self.optimizer, optim.ZerothOrder):
            return self.optimizer.step_count
        return self.cell.warmup

    def breakdown(self, peaks: dict[str, int]) -> tuple[str, dict[str, int]]:
        """The probe the breakdown is derived from, and weights / state / gradients / transient bytes. The gradients
        are those alive after the step, or for a method that applies and frees them in backward (LOMO's) the largest
        one alive at once."""
        probe = "torch_allocated" if self.device.type == "cuda" else "cpu_hwm"
        # On CPU the peak is the whole process's: the interpreter and libraries read before the build are not transient.
        floor = self.baseline[probe] if self.device.type == "cpu" else 0
        weights = models.param_bytes(self.model)
        state = optim.state_bytes(self.optimizer)
        gradients = sum(shards.local(p.grad).nbytes for p in self.model.parameters() if p.grad is not None)
        if optim.fused_backward(type(self.optimizer)):
            gradients = self.optimizer.largest_gradient
        return probe, {
            "weights": weights,
            "trainable": models.param_bytes(self.model, trainable_only=True),
            "optimizer_state": state,
            "gradients": gradients,
            "autocast_cache": self.autocast_cache,
            "transient": peaks[probe] - floor - weights - state - gradients - self.autocast_cache,
            # of the transient, the logits a forward makes: with a large vocabulary the largest single tensor
            "logits": workloads.logits_bytes(self.workload, self.model.config.vocab_size,
                                             models.dtype(self.cell.dtype)),
        }

    def record(self, peaks: dict[str, int], step_seconds: list[float], steps: int,
               per_gpu: list[dict[str, int]] | None = None) -> Record:
        """The record of ``steps`` measured steps with these peaks and times; of a cell run as several ranks (every
        rank calls this), the most any rank reached, each rank's peaks, and the breakdown of the rank that peaked.
        A pipelined cell's ``per_gpu`` peaks are its ranks'."""
        breakdown_probe, breakdown = self.breakdown(peaks)
        per_rank: list[dict[str, int]] = per_gpu or []
        if per_gpu:
            peaks = {**peaks, **{name: max(p[name] for p in per_gpu) for name in per_gpu[0]}}
        if self.rank is not None:
            per_rank, breakdowns = zip(*ranks.gathered((peaks, breakdown)), strict=True)
            worst = max(range(len(per_rank)), key=lambda r: per_rank[r][breakdown_probe])
            peaks = {name: max(p[name] for p in per_rank) for name in peaks}
            breakdown = breakdowns[worst]
        state_dtype = optim.state_dtype(self.optimizer)
        hparams = {k: json_safe(v) for k, v in self.optimizer.defaults.items()}
        if isinstance(self.optimizer, optim.ZerothOrder):
            hparams["seed"] = self.optimizer.state["global"]["seed"]
        return record_for(
            self.cell,
            params=models.param_count(self.model),
            trainable_params=models.param_count(self.model, trainable_only=True),
            peak_bytes=peaks,
            rank_peak_bytes=list(per_rank),
            baseline_bytes=self.baseline,
            breakdown=breakdown,
            breakdown_probe=breakdown_probe,
            probe_methods=probes.probe_methods(self.device, self.probes),
            cuda_memory=self.cuda_memory,
            step_seconds=probes.summarize(step_seconds),
            phases=with_other(self.phases.timer.medians(), step_seconds) if self.phases.timer else {},
            forwards_per_step=self.calls[0] / steps,
            timed_from_step=self.timed_from_step,
            state_dtype=str(state_dtype).removeprefix("torch.") if state_dtype else None,
            hparams=hparams,
            env=self.env,
        )


def torch_device(name: str) -> torch.device:
    """``name`` as a torch device; a bare ``cuda`` is ``cuda:0``, the card CUDA numbers first (torch.cuda's
    setters refuse a device without an index, and every probe must watch the same card)."""
    device = torch.device(name)
    return torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device


def cuda_memory(device: torch.device, active: Sequence[probes.Probe], baseline: dict[str, int]) -> dict[str, int]:
    """The card at the start of a cell, its CUDA context made and nothing built: ``cuda_total`` and ``cuda_free`` as
    CUDA reports them and this process's ``context``; where NVML reads the card, also its ``nvml_total`` (what
    nvidia-smi shows) and the driver's ``reserve``: that total less what CUDA has free less the context."""
    free, total = torch.cuda.mem_get_info(device)
    nvml = next((p for p in active if isinstance(p, probes.Nvml)), None)
    if nvml is None:
        # CUDA's own view: what is in use before anything is built is this process's context
        return {"cuda_total": total, "cuda_free": free, "context": total - free}
    context = nvml.reading() - baseline[nvml.name]
    card = nvml.total()
    return {"cuda_total": total, "cuda_free": free, "context": context, "nvml_total": card,
            "reserve": max(0, card - free - context)}


def cap_allocator(card_bytes: int, memory: dict[str, int], device: torch.device) -> int:
    """Cap the caching allocator where a card of ``card_bytes`` (its total as NVML reports it) would stop it: that
    total less the driver's reserve, measured on this card and taken to be alike. Returns the cap applied."""
    if "nvml_total" in memory and card_bytes >= memory["nvml_total"]:
        return memory["cuda_total"]  # this very card (a larger one the parent refuses): all of it, as it is
    cap = card_bytes - memory.get("reserve", 0)
    if cap > memory["cuda_total"]:
        raise UsageError(f"cannot emulate a card of {card_bytes / GIB:.1f} GiB on {device}, which gives CUDA "
                         f"{memory['cuda_total'] / GIB:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap / memory["cuda_total"], device)
    return cap


def prepare(cell: Cell) -> Prepared:
    """Take the baseline readings, then build the model, batch, optimizer and closure of ``cell`` here (a rank's
    share of them, for a cell run as several ranks)."""
    rank = ranks.Rank.from_env() if cell.strategy in strategies.SPAWNED else None
    device = ranks.device(cell.device, rank) if rank else torch_device(cell.device)
    workload = workloads.get(cell.workload)
    # The packages the optimizer and the tuning mode need are loaded first: their libraries belong to the process
    # floor, as torch's do; so does a gloo process group (NCCL makes its buffers at the first collective, in the peak).
    optim.load_package(cell.optimizer, cell.hparams)
    models.load_tuning(cell.tuning)
    if rank:
        ranks.join(device, rank)
    # Baselines come before the first CUDA call: nvml's device-minus-baseline figure must count this process's
    # CUDA context, as the per-process figure does.
    active = probes.probes_for(device)
    baseline = {p.name: p.reading() for p in active}
    for probe in active:
        if isinstance(probe, probes.Nvml):
            probe.baseline_bytes = baseline[probe.name]
    memory: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if cell.dtype == "bfloat16":  # the parent refuses it through NVML; where NVML is missing, here
            check_bfloat16(cell.dtype, torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
        memory = cuda_memory(device, active, baseline)
        if cell.memory_cap_bytes:
            memory["cap"] = cap_allocator(cell.memory_cap_bytes, memory, device)
    env = environment(device)

    torch.manual_seed(0)
    if cell.strategy == "fsdp":
        model = ranks.sharded(models.spec(cell.model), device, models.dtype(cell.param_dtype), rank)
    elif cell.strategy == "pipeline":
        model = ranks.pipelined(cell.model, models.dtype(cell.param_dtype), cell.ranks, memory.get("cap"))
    else:
        model = models.apply_tuning(models.build(cell.model, device, models.dtype(cell.param_dtype)), cell.tuning)
    if cell.checkpointing:
        models.enable_checkpointing(model)
    batch = workloads.make_batch(workload, model.config.vocab_size, device)
    if rank:
        workload, batch = ranks.split(workload, batch, rank)
    optimizer = optim.create(cell.optimizer, optim.decay_groups(model.named_parameters()), config=model.config,
                             **cell.hparams)
    phases = Phases()
    if isinstance(optimizer, optim.ZerothOrder):
        optimizer.phase = phases
        optimizer.reach_steady_state()
    precision = precision_for(cell, optimizer, device)
    closure, calls = make_closure(model, optimizer, workload, batch, phases, precision)
    return Prepared(cell, device, model, optimizer, averaged(closure, model, optimizer, rank), calls, phases, active,
                    baseline, env, workload, precision, cuda_memory=memory,
                    autocast_cache=autocast_cache_bytes(model, workload, precision, device), rank=rank)


def averaged(closure: Callable[[], torch.Tensor], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             rank: ranks.Rank | None) -> Callable[[], torch.Tensor]:
    """The closure a rank's zeroth-order method drives: its loss averaged over the ranks (backprop's ranks agree
    through their gradients, which FSDP averages)."""
    if rank is None or not optim.forward_only(type(optimizer)):
        return closure
    return ranks.averaged(closure, rank.world, model)


def warmup_closure(prepared: Prepared) -> Callable[[], torch.Tensor]:
    """The closure warm-up steps drive: the measured one, or the same loss on the first ``warmup_batch`` examples."""
    cell, workload = prepared.cell, prepared.workload
    if cell.warmup_batch is None or cell.warmup_batch >= workload.batch_size:
        return prepared.closure
    small = dataclasses.replace(workload, batch_size=cell.warmup_batch)
    batch = workloads.make_batch(small, prepared.model.config.vocab_size, prepared.device)
    closure, _ = make_closure(prepared.model, prepared.optimizer, small, batch, prepared.phases, prepared.precision)
    return averaged(closure, prepared.model, prepared.optimizer, prepared.rank)


def measure(cell: Cell, timeline: Path | None = None) -> Record:
    """Run ``cell`` in this process: baseline → build → batch → warm-up → reset peaks → measured steps; then,
    for a
    cell that asks for a timeline, one tracked step whose timeline is written at ``timeline``."""
    prepared = prepare(cell)
    warm = warmup_closure(prepared)
    for _ in range(cell.warmup):
        prepared.step(warm)
    prepared.start_measuring()
    pipelined = cell.strategy == "pipeline"
    if pipelined:
        ranks.reset_gpu_peaks(cell.ranks)
    timer = probes.StepTimer(prepared.device)
    with contextlib.ExitStack() as region:
        for probe in prepared.probes:
            region.enter_context(probe)
        for _ in range(cell.steps):
            with timer.step():
                prepared.step()
            if prepared.phases.timer:
                prepared.phases.timer.end_step()
    record = prepared.record({p.name: p.peak_bytes for p in prepared.probes}, timer.seconds, cell.steps,
                             ranks.gpu_peaks(cell.ranks) if pipelined else None)
    if cell.timeline:
        if timeline is None:
            raise ValueError("a timeline cell needs a path to write its timeline to")
        track_step(prepared, record, timeline)
    return record


def track_step(prepared: Prepared, record: Record, path: Path) -> None:
    """One more step after the measured ones, tracked storage by storage: tracking slows every operation, so this
    step is never timed nor under the probes. Its timeline goes to ``path``; on CUDA the allocator's snapshot of the
    step goes beside it (:data:`SNAPSHOT_FILE`)."""
    tracker = memtrack.Tracker(prepared.model, prepared.optimizer, prepared.device)
    cuda = prepared.device.type == "cuda"
    snapshot = path.with_name(SNAPSHOT_FILE)
    prepared.phases.timer = tracker
    with memtrack.cuda_snapshot(str(snapshot), prepared.device) if cuda else contextlib.nullcontext(), tracker:
        prepared.step()
    prepared.phases.timer = None
    cell = prepared.cell
    tracker.timeline(model=cell.model, optimizer=cell.optimizer, workload=cell.workload, tuning=cell.tuning,
                     dtype=cell.dtype, precision=cell.precision, device=cell.device, hparams=record.hparams,
                     measured=record.peak_bytes, baseline=record.baseline_bytes,
                     snapshot=snapshot.name if cuda else None).save(path)


#: prctl's option that asks the kernel to signal a process when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), and exit now if it already has (it is no
    longer ``parent``): an orphaned measurement would hold the GPU while the next job measures."""
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was made
        sys.exit("zomem: the process that started this measurement has gone")


def main(cell_path: str, result_path: str) -> int:
    """Read the cell, measure it, write the record (an ``oom`` record on out of memory) and, for a timeline cell,
    its timeline beside it. Of a cell's several ranks, rank 0 writes the record, and any rank its failure."""
    cell = Cell.from_json(Path(cell_path).read_text())
    rank = ranks.Rank.from_env().rank if cell.strategy in strategies.SPAWNED else 0
    try:
        record = measure(cell, Path(result_path).with_name(TIMELINE_FILE))
    except optim.PackageUnavailable as exc:  # the method is registered, and its cells say why they cannot run here
        record = record_for(cell, status="error", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure of a cell becomes its record
        if not is_oom(exc):
            raise
        record = record_for(cell, status="oom", error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    if rank == 0 or record.status != "ok":
        # whole or not at all: the harness may kill a failed rank's peers as they write theirs
        partial = Path(result_path).with_suffix(".partial")
        partial.write_text(record.to_json())
        os.replace(partial, result_path)
    if record.status == "ok":  # a failed rank leaves at once: its peers wait in a collective, and leaving may too
        ranks.leave()
    return 0


def child(cell_path: str, result_path: str, stderr_path: str, env: dict[str, str], parent: int) -> None:
    """A measuring child, forked by the harness's fork server (``parent``): its output goes to ``stderr_path`` (the
    harness reads its tail), its environment becomes ``env`` (the caller's, as a fresh process would inherit it) and
    ``env``'s PYTHONPATH is put on its path, so plug-ins load as they would in a fresh interpreter."""
    os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    # The server exits when the process that runs the cells does, and that ends this child (die_with_parent); this
    # child's copy of the server's keep-alive pipe would keep the server, and so itself, alive.
    from multiprocessing import forkserver

    os.close(forkserver._forkserver._forkserver_alive_fd)
    die_with_parent(parent)
    os.environ.clear()
    os.environ.update(env)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.exit(main(cell_path, result_path))
