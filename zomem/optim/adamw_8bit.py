"""AdamW with 8-bit block-quantised moments (Dettmers et al., 2022): bitsandbytes where it loads, otherwise torchao
(the optional extra ``zomem[torchao]``: once installed, transformers imports it with every model it builds)."""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

from zomem.optim.base import check_positive
from zomem.optim.packages import PackageOptimizer, PackageUnavailable, named_groups, require

BACKENDS = ("auto", "bitsandbytes", "torchao")
#: each moment of a quantised tensor: one byte per element and a float32 absolute maximum per block of 256
QUANTISED_BYTES = 1 + 4 / 256


class AdamW8bit(PackageOptimizer):
    """AdamW with 8-bit block-quantised moments: bitsandbytes' AdamW8bit, or torchao's where bitsandbytes cannot load.

    Each moment is stored in 8 bits on a dynamic quantisation map with a float32 scale per block of 256 elements, and
    dequantised to float32 for each update.

    Tensors smaller than ``min_8bit_size`` elements keep float32 moments (both packages' rule, at 4096 by default;
    only bitsandbytes lets it be changed). The record's ``backend`` says which package ran.
    """

    #: two moments of one byte per parameter (and the blocks' scales): 0.5P beside float32 weights
    state_copies: ClassVar[float] = 2 * QUANTISED_BYTES
    #: the state's bytes per element whatever the weights' dtype (read by the estimator)
    state_itemsize: ClassVar[int] = 1

    @classmethod
    def load_package(cls, hparams: dict[str, Any]) -> ModuleType:
        backend = hparams.get("backend", "auto")
        if backend in ("auto", "bitsandbytes"):
            try:
                return require("bitsandbytes", "bitsandbytes", "adamw-8bit")
            except PackageUnavailable as missing:
                if backend == "bitsandbytes":
                    raise
                try:
                    return require("torchao.optim", "torchao", "adamw-8bit")
                except PackageUnavailable as exc:
                    raise PackageUnavailable(f"{missing}; nor can its fallback: {exc} (the optional extra "
                                             "zomem[torchao])") from exc
        return require("torchao.optim", "torchao", "adamw-8bit")

    def __init__(self, params: Any, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, backend: str = "auto", min_8bit_size: int = 4096) -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        if backend not in BACKENDS:
            raise ValueError(f"invalid backend: {backend!r} (one of {', '.join(BACKENDS)})")
        if not (isinstance(min_8bit_size, int) and min_8bit_size >= 0):
            raise ValueError(f"invalid min_8bit_size: {min_8bit_size!r} (an element count >= 0)")
        groups = [{**options, "params": [p for _, p in members]} for options, members in named_groups(params)]
        package = self.load_package({"backend": backend})
        if package.__name__ == "bitsandbytes":
            inner = package.optim.AdamW8bit(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                            min_8bit_size=min_8bit_size)
        else:
            if min_8bit_size != 4096:
                raise ValueError(f"invalid min_8bit_size: {min_8bit_size} (torchao quantises from 4096 elements only)")
            inner = package.AdamW8bit(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(inner, {"backend": package.__name__.split(".")[0], "min_8bit_size": min_8bit_size})

    @staticmethod
    def step_temporaries(hparams: dict[str, Any], device: str = "cuda") -> tuple[float, float]:
        """bitsandbytes' CPU update dequantises both moments of a tensor to float32 and computes the gradient, the
        denominator and its square root as new float32 tensors: about five float32 copies of the largest tensor in
        copies of float32 weights; its GPU kernels update in place (read by the estimator)."""
        return (0.0, 5.0) if device == "cpu" else (0.0, 0.0)
