"""What the estimator knows of a model's parameters: counted once on the meta device, for any architecture."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from zomem import models

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Shape:
    """What the estimator needs to know about a model's parameters."""

    spec: models.ModelSpec
    #: every parameter (adapters included), and those trained (all of them, or the adapters or prefix)
    params: int
    #: parameters of one decoder layer, and of everything outside the layers (embeddings, final norm, an untied head)
    layer_params: int
    root_params: int
    #: the largest trained tensor: what a walk's block or an update's temporary is bounded by
    largest_tensor: int
    trainable: int


@functools.cache
def meta_model(model: str, tuning: str = "full") -> torch.nn.Module:
    """The model on the meta device, wrapped for ``tuning`` (cached: placement asks for it repeatedly; dtypes are
    priced separately)."""
    return models.apply_tuning(models.build_meta(model), tuning)


@functools.cache
def shape(model: str, tuning: str = "full") -> Shape:
    """Parameter counts of ``model`` tuned as ``tuning``, tied weights counted once."""
    meta = meta_model(model, tuning)
    layers = models.decoder_layers(meta_model(model))
    layer_params = models.param_count(layers[0][1]) if layers else 0
    params = models.param_count(meta)
    trained = [p for p in meta.parameters() if p.requires_grad]
    return Shape(models.spec(model), params, layer_params, params - layer_params * len(layers),
                 max(p.numel() for p in trained), sum(p.numel() for p in trained))
