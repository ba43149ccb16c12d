"""The rank side of a cell run as several processes: the process group, how the ranks share the model, each rank's
slice of the batch, and the one thing a zeroth-order method must agree on across ranks, its losses.

Strategies (:data:`zomem.strategies.STRATEGIES`):

- ``fsdp``: FSDP2 (``fully_shard``) per decoder layer and at the root. Each rank keeps a shard of every weight (and of
  a first-order method's gradients and state); a zeroth-order method perturbs and updates its shards in place.
- ``replicate``: every rank holds the whole model (zeroth-order methods only: they exchange no gradients).
- ``pipeline``: the layers placed over the GPUs by accelerate, in one process (CUDA only).

With ``fsdp`` and ``replicate`` the ranks split the batch; a zeroth-order method's forward returns the loss averaged
over the ranks (one scalar all-reduce), so every rank takes the step one rank would take on the whole batch. The
harness starts the ranks (gloo on CPU, NCCL on CUDA, one GPU each) and gives each the environment read here.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from zomem import models, workloads
from zomem.errors import UsageError

#: where the ranks of a cell meet (a ``file://`` URL the harness makes in the cell's folder)
RENDEZVOUS = "ZOMEM_RENDEZVOUS"
#: how long a rank waits for the others in a collective before it gives up (the harness's timeout usually ends it first)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Rank:
    """This process's place among a cell's ranks, as torch's launchers name it."""

    rank: int
    world: int
    local: int

    @classmethod
    def from_env(cls) -> Rank:
        """The rank the harness started this process as."""
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))

    @staticmethod
    def env(rank: int, world: int, rendezvous: str) -> dict[str, str]:
        """The environment a rank is started with."""
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), RENDEZVOUS: rendezvous}


def device(name: str, rank: Rank) -> torch.device:
    """The device a rank runs on: its own GPU on CUDA (by local rank; a lone rank's the one ``name`` gives); on CPU
    the shared CPU."""
    if not name.startswith("cuda"):
        return torch.device("cpu")
    return torch.device("cuda", torch.device(name).index or 0) if rank.world == 1 else torch.device("cuda", rank.local)


def join(device: torch.device, rank: Rank) -> None:
    """Join the cell's process group: NCCL between GPUs, gloo on CPU."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=os.environ[RENDEZVOUS],
                            rank=rank.rank, world_size=rank.world, timeout=COLLECTIVE_TIMEOUT)


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def sharded(spec: models.ModelSpec, device: torch.device, dtype: torch.dtype, rank: Rank) -> nn.Module:
    """The model with FSDP2 over every decoder layer and at the root, built on the meta device and given storage
    for this rank's shards only; its weights are those :func:`zomem.models.build` gives the whole model."""
    model = models.build_meta(spec, dtype)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}  # computed on CPU by build_meta
    mesh = init_device_mesh(device.type, (rank.world,))
    layers = models.decoder_layers(model)
    if not layers:
        raise UsageError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for _, layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    models.fill(model, models.INIT_SEED)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # fill drew each whole matrix once: its block must not stay reserved in the peak
    return model.eval()


def pipelined(name: str, dtype: torch.dtype, gpus: int, cap: int | None = None) -> nn.Module:
    """The model built in host memory and dispatched over the first ``gpus`` GPUs by accelerate's balanced device
    map, each decoder layer whole on one GPU (how the MeZO code runs its largest models); with a ``cap``, every GPU
    is held to it, as the first one already is."""
    from accelerate import dispatch_model

    totals = [torch.cuda.mem_get_info(i)[1] for i in range(gpus)]
    if cap is not None:
        for i in range(1, gpus):
            torch.cuda.set_per_process_memory_fraction(min(cap / totals[i], 1.0), i)
    model = models.build(name, "cpu", dtype)
    return dispatch_model(model, models.balanced_map(model, dtype, tuple(cap or total for total in totals)))


def reset_gpu_peaks(gpus: int) -> None:
    """Start every GPU's allocator peaks afresh (the probes watch the first GPU only)."""
    for i in range(gpus):
        torch.cuda.reset_peak_memory_stats(i)


def gpu_peaks(gpus: int) -> list[dict[str, int]]:
    """Each GPU's allocator peaks since :func:`reset_gpu_peaks`: a pipelined cell's peaks per GPU."""
    return [{"torch_allocated": torch.cuda.max_memory_allocated(i), "torch_reserved": torch.cuda.max_memory_reserved(i)}
            for i in range(gpus)]


def split(workload: workloads.Workload, batch: workloads.Batch,
          rank: Rank) -> tuple[workloads.Workload, workloads.Batch]:
    """This rank's share of the batch: its ``ceil(batch_size / world)`` consecutive examples (each with its
    candidates), counted round from the first where the batch does not divide (MeZO's one-example workloads run an
    example on every rank, as the estimator assumes)."""
    each = -(-workload.batch_size // rank.world)
    examples = (torch.arange(each) + rank.rank * each) % workload.batch_size
    sequences = (examples[:, None] * workload.candidates + torch.arange(workload.candidates)).view(-1)
    examples, sequences = examples.to(batch.labels.device), sequences.to(batch.input_ids.device)
    return dataclasses.replace(workload, batch_size=each), dataclasses.replace(
        batch, input_ids=batch.input_ids[sequences], attention_mask=batch.attention_mask[sequences],
        labels=batch.labels[examples])


def averaged(closure: Callable[[], torch.Tensor], world: int, model: nn.Module) -> Callable[[], torch.Tensor]:
    """``closure`` whose loss is the mean over the ranks (each ran its share of the batch), so every rank's
    zeroth-order method reads the loss of the whole batch; a sharded model is resharded after each forward."""

    def mean_loss() -> torch.Tensor:
        loss = closure().detach().clone()
        if isinstance(model, FSDPModule):
            # FSDP2 leaves the root unit gathered after a forward, for the backward that would follow; a walk must
            # find only shards, so the root lets go of its whole tensors here
            model.reshard()
        dist.all_reduce(loss)  # gloo has no AVG: sum, then divide
        return loss / world

    return mean_loss


def gathered(value: Any) -> list[Any]:
    """``value`` from every rank, rank 0's first (every rank must call this)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
