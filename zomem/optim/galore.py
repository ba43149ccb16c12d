"""GaLore (Zhao et al., 2024): AdamW whose moments live in a low-rank projection of each matrix's gradient, from the
galore-torch package."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar

import torch

from zomem.optim.base import check_positive
from zomem.optim.lezo import LAYER
from zomem.optim.packages import PackageOptimizer, named_groups, require

PROJECTIONS = ("std", "reverse_std", "right", "left", "full")


def projected(name: str | None, shape: tuple[int, ...]) -> bool:
    """Whether GaLore projects a parameter: the matrices of the decoder layers (attention and MLP), found by name as
    LeZO finds layers; an unnamed matrix counts as one. Embeddings, the head, norms and biases get plain AdamW."""
    return len(shape) == 2 and (name is None or LAYER.search(name) is not None)


class GaLore(PackageOptimizer):
    """GaLore AdamW (galore-torch): Adam's moments of each layer matrix kept for its gradient projected to rank r.

    Each layer matrix's gradient G (m×n) is projected by P from G's SVD, refreshed every ``update_proj_gap`` steps;
    the update is projected back and scaled by ``scale``; the other parameters get AdamW.

    With m ≥ n, P = Vᵀ[:r] (r×n) and R = G·Pᵀ (m×r); otherwise P = U[:, :r] (m×r) and R = Pᵀ·G (r×n). Per
    matrix it
    keeps P and two moments of R's shape. Defaults: the paper's rank 128, refresh every 200 steps and scale 0.25.
    """

    state_copies: ClassVar[float] = 0.0  # projectors and rank-r moments: see named_state_elements

    @classmethod
    def load_package(cls, hparams: dict[str, Any]) -> ModuleType:
        # galore-torch imports bitsandbytes for its 8-bit variant: where that cannot load, neither can this
        return require("galore_torch", "galore-torch", "galore")

    def __init__(self, params: Any, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std") -> None:
        check_positive("lr", lr, allow_zero=True)
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"invalid rank: {rank!r} (a positive integer)")
        if not (isinstance(update_proj_gap, int) and update_proj_gap >= 1):
            raise ValueError(f"invalid update_proj_gap: {update_proj_gap!r} (a positive integer)")
        check_positive("scale", scale)
        if proj_type not in PROJECTIONS:
            raise ValueError(f"invalid proj_type: {proj_type!r} (one of {', '.join(PROJECTIONS)})")
        projection = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
        groups = []
        for options, members in named_groups(params):
            low_rank = [p for name, p in members if projected(name, tuple(p.shape))]
            full = [p for name, p in members if not projected(name, tuple(p.shape))]
            # the package projects exactly the groups that carry a rank
            groups += [{**options, "params": low_rank, **projection}] if low_rank else []
            groups += [{**options, "params": full}] if full else []
        inner = self.load_package({}).GaLoreAdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                                no_deprecation_warning=True)
        super().__init__(inner, projection)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One step of the package's GaLore AdamW; a projector it refreshed is then kept as its r rows (columns) alone:
        for float32 weights the package keeps a view of the SVD's whole factor, min(m, n) rows of which it uses r."""
        loss = super().step(closure)
        for state in self.state.values():
            projector = state.get("projector")
            if projector is not None and isinstance(projector.ortho_matrix, torch.Tensor):
                matrix = projector.ortho_matrix
                if matrix.untyped_storage().nbytes() > matrix.nbytes:
                    projector.ortho_matrix = matrix.clone(memory_format=torch.contiguous_format)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The package's state dict with each projector as its matrix alone (its settings are its group's): the
        package keeps an object there, which ``torch.load``'s default (weights only) refuses to read back."""
        saved = self.inner.state_dict()
        saved["state"] = {key: {**state, "projector": {"ortho_matrix": state["projector"].ortho_matrix}}
                          if "projector" in state else state for key, state in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume, turning each saved projector back into the package's object."""
        super().load_state_dict(state_dict)
        projector = self.load_package({}).galore_projector.GaLoreProjector
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param, {})
                if isinstance(state.get("projector"), dict):
                    matrix = state["projector"]["ortho_matrix"]
                    state["projector"] = projector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                                   scale=group["scale"], proj_type=group["proj_type"])
                    state["projector"].ortho_matrix = matrix

    @staticmethod
    def named_state_elements(named_shapes: list[tuple[str, tuple[int, ...]]], hparams: dict[str, Any],
                             config: Any = None) -> int:
        """Per projected matrix (m×n, rank r' = min(r, m, n)): its projector and two rank-r' moments; two moments of
        every other tensor (read by the estimator). The projectors of the ``std`` rule (the default)."""
        rank = hparams.get("rank", 128)
        total = 0
        for name, shape in named_shapes:
            if projected(name, shape):
                m, n = shape
                r = min(rank, m, n)
                total += r * n + 2 * m * r if m >= n else m * r + 2 * r * n
            else:
                total += 2 * math.prod(shape)
        return total

    @staticmethod
    def step_temporaries(hparams: dict[str, Any], device: str = "cuda") -> tuple[float, float]:
        """The package's AdamW makes √v + ε and m/(√v + ε) as new tensors, one parameter at a time: two copies of
        the
        largest tensor, an embedding (read by the estimator)."""
        return 0.0, 2.0
