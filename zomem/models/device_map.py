"""A model's decoder layers, the units kept whole on one device, and accelerate's balanced device map of a model over
GPUs: where the pipeline strategy puts a model's layers, and where the estimator predicts it puts them."""

from __future__ import annotations

import os

import torch
from torch import nn


def layer_classes(model: nn.Module) -> list[str]:
    """The classes of ``model``'s decoder layers: those transformers keeps whole on one device (``_no_split_modules``;
    a decoder layer has a residual connection)."""
    return list(getattr(model, "_no_split_modules", None) or ())


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model``'s decoder layers with their names."""
    names = set(layer_classes(model))
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in names]


def balanced(meta: nn.Module, torch_dtype: torch.dtype, budgets: tuple[int, ...]) -> dict[str, int | str]:
    """The device map accelerate balances over GPUs with these weight budgets (bytes), for ``meta`` (a model on the
    meta device, or any model: only its parameters' sizes are read)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = layer_classes(meta)
    # The NVML check keeps torch from initialising CUDA in a parent process that places for GPUs it does not use.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    max_memory = get_balanced_memory(meta, dict(enumerate(budgets)), no_split_module_classes=no_split,
                                     dtype=torch_dtype)
    return infer_auto_device_map(meta, max_memory, no_split_module_classes=no_split, dtype=torch_dtype)
