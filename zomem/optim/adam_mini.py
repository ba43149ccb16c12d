"""Adam-mini (Zhang et al., 2024): Adam's first moment, one second moment per block of parameters, from the adam-mini
package."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import torch

from zomem.optim.base import check_positive
from zomem.optim.packages import PackageOptimizer, flat, named_groups, require


class AdamMini(PackageOptimizer):
    """Adam-mini (adam-mini): Adam's first moment for every parameter, and one second moment per block of them.

    A block is a head of the query and key projections, an output neuron of the other matrices, a whole tensor
    elsewhere; biases keep Adam's. ``embeddings="adam"`` (the paper's algorithm, and adam-mini 1.0) keeps Adam's v for
    the embeddings and the output layer too; ``"token"`` (adam-mini 1.1's default) one v per token. The package picks
    blocks by parameter name and needs the model's hidden size and heads (``config``).

    It computes in the weights' dtype: in float16 its eps of 1e-8 is 0, and a block whose gradient is zero divides 0
    by 0, so float16 weights are refused (bfloat16, float32 and mixed precision run).
    """

    state_copies: ClassVar[float] = 1.0  # the first moment, and the second moments by name: see named_state_elements
    #: the optimizer is built with the model's config (its hidden size and heads)
    takes_config: ClassVar[bool] = True

    @classmethod
    def load_package(cls, hparams: dict[str, Any]) -> ModuleType:
        return require("adam_mini", "adam-mini", "adam-mini")

    def __init__(self, params: Any, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, embeddings: str = "adam", *, config: Any = None) -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        if embeddings not in EMBEDDINGS:
            raise ValueError(f"invalid embeddings: {embeddings!r} (one of {', '.join(EMBEDDINGS)})")
        named = flat(named_groups(params))
        if any(p.dtype == torch.float16 for _, p in named):
            raise ValueError("invalid dtype: adam-mini computes in the weights' dtype, where its eps rounds to 0 in "
                             "float16 and a zero gradient gives NaN; use bfloat16, float32 or mixed precision")
        package = self.load_package({})
        dim, heads, kv_heads = dimensions(config)
        inner = package.Adam_mini(named, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                  dim=dim or 1, n_heads=heads or 1, n_kv_heads=kv_heads, verbose=False)
        if embeddings == "adam":
            # the package's own switch: a name it finds among these takes its Adam branch, element by element
            inner.adam_block_names |= inner.embd_names | inner.output_names
        matrices = matrix_names(inner)
        for j, group in enumerate(inner.param_groups):
            # The package picks a block's second moments by name, at each step; a tensor that does not have the
            # shape its name promises goes to its per-tensor branch instead (the name decided weight decay already).
            name, (param,) = group["name"], group["params"]
            if "bias" in name:
                continue
            if any(key in name for key in inner.wqk_names):
                if not (dim and heads):
                    raise ValueError(f"invalid config: {type(config).__name__} (adam-mini splits {name} by attention "
                                     "head, so it needs the model's config with its hidden_size and "
                                     "num_attention_heads)")
                whole = param.numel() % inner.head_numel == 0  # not an adapter on the projection (LoRA's A or B)
            else:
                # a vector named like a matrix: OPT's final_layer_norm, which the package takes for an output layer
                whole = param.ndim >= 2 or not any(key in name for key in matrices)
            if not whole:
                group["name"] = f"block{j}"
        # it takes every visible GPU for a rank of model parallelism and gathers across them; zomem runs one process
        inner.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        super().__init__(inner, {"embeddings": embeddings})

    @classmethod
    def named_state_elements(cls, named_shapes: Sequence[tuple[str, tuple[int, ...]]], hparams: dict[str, Any],
                             config: Any = None) -> int:
        """The first moment of every parameter and the second moments the package keeps for each (read by the
        estimator): the optimizer is built on meta tensors of these names and shapes, which allocates nothing."""
        named = [(name, torch.nn.Parameter(torch.empty(shape, device="meta"))) for name, shape in named_shapes]
        optimizer = cls(named, embeddings=hparams.get("embeddings", "adam"), config=config)
        return sum(p.numel() + second_moments(optimizer.inner, group["name"], p)
                   for group in optimizer.param_groups for p in group["params"])

    @staticmethod
    def step_temporaries(hparams: dict[str, Any], device: str = "cuda") -> tuple[float, float]:
        """The package's update m·(step size) and its negation are new tensors, one parameter at a time: two copies
        of the largest tensor (read by the estimator)."""
        return 0.0, 2.0


#: where the embeddings and the output layer keep their second moments: Adam's, per element, or one per token
EMBEDDINGS = ("adam", "token")


def matrix_names(inner: Any) -> set[str]:
    """The names by which the package (``inner``, its optimizer) keeps one second moment per output neuron."""
    return set().union(inner.embd_names, inner.output_names, inner.wv_names, inner.attn_proj_names, inner.mlp_names)


def second_moments(inner: Any, name: str, param: torch.Tensor) -> int:
    """Elements of the second moment the package (``inner``) keeps for ``param`` under the group name ``name``: the
    branch of its step that the name picks."""
    if any(key in name for key in inner.adam_block_names):
        return param.numel()
    if any(key in name for key in inner.wqk_names):
        return param.numel() // inner.head_numel
    return param.shape[0] if any(key in name for key in matrix_names(inner)) else 1


def dimensions(config: Any) -> tuple[int | None, int | None, int | None]:
    """Hidden size, attention heads and key/value heads from a transformers config (None where it has none)."""
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "hidden_size", None), heads, getattr(config, "num_key_value_heads", None) or heads
