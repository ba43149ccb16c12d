"""The models zomem builds: OPT (the default family), Llama 2/3.x, Mistral and Qwen2.5 from their published
configs, tiny test configs of each, and any causal LM a local ``config.json`` describes.

Memory does not depend on weight values, so no model hub is touched: a model is constructed on the meta device
(free at any size), materialised empty on the target device and filled in place (:mod:`build`).
"""

from __future__ import annotations

import torch
from torch import nn

from zomem import shards
from zomem.errors import UsageError
from zomem.models import llama, local, opt, qwen
from zomem.models.build import INIT_SEED, fill, materialise
from zomem.models.device_map import balanced as balanced_map
from zomem.models.device_map import decoder_layers
from zomem.models.build import build as _build
from zomem.models.build import build_meta as _build_meta
from zomem.models.spec import ModelSpec
from zomem.models.tuning import (LORA_SETTINGS, PREFIX_TOKENS, TUNINGS, apply_tuning, enable_checkpointing,
                                 load_tuning)
from zomem.registry import Registry

__all__ = ["DTYPES", "FAMILIES", "INIT_SEED", "LADDER", "LORA_SETTINGS", "MODELS", "PREFIX_TOKENS", "TEST_LADDER",
           "TUNINGS", "ModelSpec", "apply_tuning", "balanced_map", "build", "build_meta", "decoder_layers",
           "dtype", "enable_checkpointing", "fill", "ladder", "load_tuning", "materialise", "modeling_modules",
           "param_bytes", "param_count", "spec"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

MODELS: Registry[ModelSpec] = Registry("model")
#: OPT's ladder, the default family: the seeds' tables are about it
LADDER = opt.LADDER
#: OPT's test configs, smallest first
TEST_LADDER = opt.TESTS
for _spec in (*opt.LADDER, *llama.MODELS, *qwen.MODELS, *opt.TESTS, *llama.TESTS, *qwen.TESTS):
    MODELS.register(_spec.name, _spec)
#: each family's models, smallest first: what ``zomem fit --family`` searches
FAMILIES: dict[str, tuple[str, ...]] = {}
for _name in MODELS.names():
    FAMILIES.setdefault(MODELS.get(_name).family, ())
    FAMILIES[MODELS.get(_name).family] += (_name,)


def spec(name: str) -> ModelSpec:
    """The model registered as ``name``, or the one a ``config.json`` (or a folder holding one) describes."""
    if name not in MODELS and local.looks_like_path(name):
        return local.load(name)
    return MODELS.get(name)


def modeling_modules() -> list[str]:
    """The transformers modules that define the registered models' architectures: a fork server imports them once,
    so that no measuring child spends its first half second doing so."""
    types = {MODELS.get(name).model_type for name in MODELS.names()}
    return sorted(f"transformers.models.{t}.modeling_{t}" for t in types)


def ladder(family: str) -> tuple[str, ...]:
    """A family's models, smallest first."""
    if family not in FAMILIES:
        raise UsageError(f"unknown family {family!r}. Valid: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def dtype(name: str) -> torch.dtype:
    """The torch dtype for a dtype name (float32, float16, bfloat16)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}. Valid: {', '.join(DTYPES)}") from None


def _spec_of(model: str | ModelSpec) -> ModelSpec:
    return spec(model) if isinstance(model, str) else model


def build_meta(model: str | ModelSpec, torch_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model on the meta device: its shapes and placement cost nothing to compute."""
    return _build_meta(_spec_of(model), torch_dtype)


def build(model: str | ModelSpec, device: torch.device | str = "cpu", torch_dtype: torch.dtype = torch.float32,
          seed: int = INIT_SEED) -> nn.Module:
    """The model on ``device`` in ``torch_dtype``, with seeded random weights, in eval mode."""
    return _build(_spec_of(model), device, torch_dtype, seed)


def param_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once each (tied weights are one parameter)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def param_bytes(module: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the parameters (and buffers, for all of them), counted once each; of a sharded one, this rank's
    shard."""
    params = sum(shards.local(p).nbytes for p in module.parameters() if p.requires_grad or not trainable_only)
    return params if trainable_only else params + sum(b.nbytes for b in module.buffers())
