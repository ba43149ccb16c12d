"""Where a model's weights go over several GPUs: accelerate's balanced device map, computed on the meta model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from zomem import models
from zomem.models.device_map import balanced
from zomem.estimate.counts import meta_model
from zomem.estimate.tracing import quiet


@functools.lru_cache(maxsize=256)
def device_map(model: str, dtype: str, budgets: tuple[int, ...]) -> dict[str, int | str]:
    """accelerate's balanced device map of ``model`` over GPUs with these weight budgets (bytes)."""
    # Placing for GPUs that are not in this machine is the point; accelerate warns about each one.
    with quiet("accelerate.utils.modeling"):
        return balanced(meta_model(model), models.dtype(dtype), budgets)


def owner(placement: dict[str, int | str]) -> Callable[[str], int | str]:
    """A function from a parameter or module name to the device of its most specific placement key."""

    def find(name: str) -> int | str:
        parts = name.split(".")
        for end in range(len(parts), -1, -1):
            key = ".".join(parts[:end])
            if key in placement:
                return placement[key]
        raise KeyError(f"accelerate's device map does not place {name!r}")

    return find


@dataclass(frozen=True)
class Placement:
    """Parameters per GPU, which GPUs run decoder layers and which the LM head, and what could not be placed."""

    params: list[int]
    layer_devices: set[int | str]
    head: int | str
    offloaded: list[str]


def place(model: str, dtype: str, gpus: int, budgets: tuple[int, ...]) -> Placement:
    """``model``'s parameters over ``gpus`` GPUs as accelerate's map with these weight budgets puts them."""
    placement = device_map(model, dtype, budgets)
    find = owner(placement)
    params = [0] * gpus
    for name, param in meta_model(model).named_parameters():  # tied weights appear once
        where = find(name)
        if isinstance(where, int):
            params[where] += param.numel()
    meta = meta_model(model)
    layers = {find(name) for name, _ in models.decoder_layers(meta)}
    head = next(name for name, m in meta.named_modules() if m is meta.get_output_embeddings())
    return Placement(params, layers, find(head),
                     [name for name, where in placement.items() if not isinstance(where, int)])
