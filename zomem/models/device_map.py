"""accelerate's balanced device map of a model over GPUs, each decoder layer whole on one: where the pipeline
strategy puts a model's layers, and where the estimator predicts it puts them."""

from __future__ import annotations

import os

import torch
from torch import nn


def balanced(meta: nn.Module, torch_dtype: torch.dtype, budgets: tuple[int, ...]) -> dict[str, int | str]:
    """The device map accelerate balances over GPUs with these weight budgets (bytes), for ``meta`` (a model on the
    meta device, or any model: only its parameters' sizes are read)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    # a decoder layer is never split across devices (it has a residual connection): each family names its class
    no_split = list(getattr(meta, "_no_split_modules", None) or ())
    # The NVML check keeps torch from initialising CUDA in a parent process that places for GPUs it does not use.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    max_memory = get_balanced_memory(meta, dict(enumerate(budgets)), no_split_module_classes=no_split,
                                     dtype=torch_dtype)
    return infer_auto_device_map(meta, max_memory, no_split_module_classes=no_split, dtype=torch_dtype)
