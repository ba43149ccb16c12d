"""Sparse MeZO (Liu et al., 2024): MeZO that perturbs and updates only the weights of small magnitude."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from zomem.optim.base import Block, ZerothOrder, check_fraction, check_positive, mix, one_thread

#: elements of a tensor read to estimate its threshold: a quantile of a bounded sample, never a full-size copy
SAMPLE = 1 << 16


class SparseMeZO(ZerothOrder):
    """Sparse MeZO: MeZO on each tensor's weights of magnitude at most h, its (1 − s)-quantile; keeps nothing.

    With m = 1[|θ| ≤ h] and h from θ at the start of the step (s = ``sparsity``, the share of each tensor left
    alone):

    L± = L(θ ± ε·m⊙z);  g = (L+ − L−)/2ε;  θ −= η·g·m⊙z.

    h is the ⌈(1 − s)·k⌉-th smallest |θ| of k ≤ 2¹⁶ elements, at positions fixed by the optimizer's seed
    (all of a smaller tensor). The mask is never stored: each walk reads it back from θ and z, since
    θ = θ₀ + o·m⊙z after a walk that moved it by o (o = ε, then −ε): m = 1[|θ − o·z| ≤ h]. That reading
    errs only for weights left alone
    within ε·|z| of the threshold, and no reading of θ and z alone can tell those from perturbed ones, so each walk
    notes where the next one would err: 32-bit positions of about 1.5% of the weights (OPT's at ε = 10⁻³), dropped
    with the step.
    """

    #: z, the mask, and the next walk's reading of it, all kept until the step ends (the noted positions, about 1.5% of
    #: the weights in 32 bits, are not counted: they are not a block's worth)
    forward_buffers: ClassVar[int] = 3
    update_buffers: ClassVar[int] = 3
    #: each tensor's threshold is a quantile of the whole tensor's magnitudes
    shardable: ClassVar[bool] = False

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, sparsity: float = 0.75, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        check_fraction("sparsity", sparsity)
        super().__init__(params, {"lr": lr, "eps": eps, "sparsity": sparsity}, seed=seed, block_size=block_size)
        self._thresholds: list[float] = []
        self._offset = 0.0  # θ − θ₀, in units of m⊙z
        self._misread: dict[tuple[int, int], torch.Tensor] = {}

    def thresholds(self) -> list[float]:
        """Each tensor's h: the (1 − s)-quantile of |θ| over a bounded sample of its elements."""
        out = []
        for j, group, param in self.params():
            flat = param.detach().view(-1)
            if flat.numel() > SAMPLE:
                generator = torch.Generator(device=flat.device).manual_seed(mix(self.state["global"]["seed"], j))
                flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=generator, device=flat.device)]
            magnitudes = flat.abs().to(self.working_dtype(param, group))
            k = max(1, math.ceil((1 - group["sparsity"]) * magnitudes.numel()))
            out.append(float(magnitudes.kthvalue(k).values))
        return out

    def _reading(self, b: Block, name: str, offset: float) -> torch.Tensor:
        """1[|θ − offset·z| ≤ h] for block ``b``, as floats in scratch buffer ``name``."""
        if offset:
            reading = torch.sub(b.x, b.z, alpha=offset, out=self.scratch(b, name))
        else:
            reading = self.scratch(b, name, like=b.x)
        return reading.abs_().le_(self._thresholds[b.index])

    def mask(self, b: Block) -> torch.Tensor:
        """Block ``b``'s m, read back from θ as the last walk left it, corrected where that reading errs."""
        mask = self._reading(b, "mask", self._offset)
        misread = self._misread.pop((b.index, b.block), None)
        if misread is not None:
            mask[misread] = 1 - mask[misread]
        return mask

    def move(self, b: Block, alpha: float, last: bool = False) -> None:
        """θ += alpha·m⊙z on block ``b``; unless it is the step's last walk,
        note where the next walk will misread m."""
        mask = self.mask(b)
        b.x.addcmul_(b.z, mask, value=alpha)
        if not last:
            misread = self._reading(b, "next", self._offset + alpha).ne_(mask).nonzero().view(-1)
            if misread.numel():
                self._misread[b.index, b.block] = misread.int()  # positions in a block: 32 bits suffice

    @torch.no_grad()
    def perturb(self, step_seed: int, alpha: float) -> None:
        """θ += alpha·m⊙z in place, block by block."""
        with self.phase("perturb"), one_thread():
            for b in self.blocks(step_seed):
                self.move(b, alpha)
        self._offset += alpha

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed, eps = self.next_step_seed(), self.defaults["eps"]
        with self.phase("perturb"):
            self._thresholds = self.thresholds()
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        # restoring θ and stepping share one regeneration of z and one reading of m per block
        with self.phase("update"), one_thread():
            for b in self.blocks(seed):
                self.move(b, eps - b.group["lr"] * grad, last=True)
        self._offset = 0.0
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus
