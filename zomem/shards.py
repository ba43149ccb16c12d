"""Tensors sharded over ranks (FSDP2's DTensors): this rank's part of one, and where that part starts."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a view: writing it writes the parameter), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def offset(tensor: torch.Tensor) -> int:
    """Where this rank's shard starts in the whole flattened tensor (0 for a tensor that is not sharded). FSDP2
    splits along the first dimension as ``torch.chunk`` does; other placements are refused."""
    if not isinstance(tensor, DTensor):
        return 0
    if tuple(tensor.placements) != (Shard(0),):
        raise ValueError(f"expected a tensor sharded along dim 0, got {tensor.placements}")
    rows, world = tensor.shape[0], tensor.device_mesh.size()
    first = min(tensor.device_mesh.get_local_rank() * -(-rows // world), rows)
    return first * (tensor.numel() // rows)
