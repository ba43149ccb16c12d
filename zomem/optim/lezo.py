"""LeZO (Wang et al., 2024): MeZO on a random subset of the layers each step, so each step perturbs and updates fewer
elements and its walks take less time."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from zomem.optim.base import Block, ZerothOrder, check_fraction, check_positive, mix

#: a layer is the first number in a parameter's name ("model.decoder.layers.3.fc1.weight" is in layer 3)
LAYER = re.compile(r"\.(\d+)\.")
#: the stream of a step's seed from which its layers are drawn
LAYER_STREAM = 1


class LeZO(ZerothOrder):
    """LeZO: MeZO on a random share 1 − ρ of the layers each step, and on every tensor outside them; keeps nothing.

    With S the step's layers, max(1, round((1 − ρ)·layers)) of them drawn from its seed (ρ = ``sparsity``), and z_S
    the perturbation zero on the layers outside S:

    L± = L(θ ± ε·z_S);  g = (L+ − L−)/2ε;  θ −= η·g·z_S.

    Layers are found by parameter name (torch keeps the names given with the parameters as ``param_names``); the
    embeddings, final norm and head belong to no layer and are walked every step. Without names each tensor is a layer.
    Layers outside S are neither drawn nor touched, which is where the time goes: fewer elements perturbed and updated.
    """

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, sparsity: float = 0.75, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        check_fraction("sparsity", sparsity)
        super().__init__(params, {"lr": lr, "eps": eps, "sparsity": sparsity}, seed=seed, block_size=block_size)

    def layers(self) -> tuple[list[list[int]], list[int]]:
        """The tensor indices of each layer (in order of first appearance), and those in no layer."""
        layers: dict[str, list[int]] = {}
        outside = []
        names = [name for g in self.param_groups for name in g.get("param_names", [None] * len(g["params"]))]
        for j, name in enumerate(names):
            if name is None:
                layers[f"tensor {j}"] = [j]
            elif found := LAYER.search(name):
                layers.setdefault(found.group(1), []).append(j)
            else:
                outside.append(j)
        return list(layers.values()), outside

    def chosen(self, step_seed: int) -> set[int]:
        """The tensor indices step ``step_seed`` walks: those of its layers S, and every tensor in no layer."""
        layers, outside = self.layers()
        keep = max(1, round((1 - self.defaults["sparsity"]) * len(layers)))
        generator = torch.Generator().manual_seed(mix(step_seed, LAYER_STREAM))
        picked = torch.randperm(len(layers), generator=generator)[:keep].tolist()
        return set(outside).union(*(layers[i] for i in picked))

    def blocks(self, step_seed: int,
               params: Iterable[tuple[int, dict[str, Any], torch.Tensor]] | None = None) -> Iterator[Block]:
        """The blocks of the step's layers only (and of the tensors in no layer)."""
        chosen = self.chosen(step_seed)
        walked = [(j, group, param) for j, group, param in (self.params() if params is None else params) if j in chosen]
        return super().blocks(step_seed, walked)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return self.descend(closure, self.next_step_seed())
