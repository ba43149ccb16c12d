"""AdaMeZO: Adam-style moments for zeroth-order SGD, rebuilt each step from a window of seeds instead of stored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from zomem.optim.base import ZerothOrder, check_positive, one_thread
from zomem.optim.zo_adam import check_betas


class AdaMeZO(ZerothOrder):
    """AdaMeZO: Adam-style m, v rebuilt each step from the last K (seed, g) pairs; θ −= η·m/(√v + ε). Keeps ~0.

    With gᵢ zᵢ the estimate of step t−i (i = 0…K−1, fewer during the first K steps):

    m = Σᵢ (1−β1)β1ⁱ·gᵢzᵢ / Σᵢ (1−β1)β1ⁱ;
    v = Σᵢ (1−β2)β2ⁱ·(gᵢzᵢ)² / Σᵢ (1−β2)β2ⁱ;  θ −= η·m/(√v + adam_eps).

    The update walks the parameters block by block (``block_size``: elements, or None for whole tensors),
    regenerating the K past z of each block into the z buffer: extra memory is two block-sized buffers (m, v),
    extra work K regenerations per element.
    """

    update_buffers: ClassVar[int] = 3  # z, m and v

    def __init__(self, params: Any, lr: float = 1e-5, eps: float = 1e-3, window: int = 10,
                 betas: tuple[float, float] = (0.7, 0.9), adam_eps: float = 1e-8, *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        check_positive("adam_eps", adam_eps)
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"invalid window: {window!r} (a whole number of steps >= 1)")
        super().__init__(params, {"lr": lr, "eps": eps, "window": window, "betas": check_betas(betas),
                                  "adam_eps": adam_eps}, seed=seed, block_size=block_size)
        #: the last K (step seed, projected gradient) pairs, oldest first
        self.state["global"]["window"] = []

    def reach_steady_state(self) -> None:
        """Fill the window with K−1 seeded synthetic (seed, g) pairs, as K−1 steps would: the next step then
        regenerates K perturbations per element, as every step of a long run does. No forward runs; the projected
        gradients are drawn small (their values change neither the memory nor the time of a step)."""
        generator = torch.Generator().manual_seed(self.state["global"]["seed"])
        past = self.defaults["window"] - 1 - len(self.state["global"]["window"])
        for _ in range(max(past, 0)):
            seed = self.next_step_seed()
            self.state["global"]["window"].append((seed, 1e-3 * float(torch.randn(1, generator=generator))))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        seed, eps = self.next_step_seed(), self.defaults["eps"]
        loss_plus, loss_minus = self.evaluate_pair(closure, seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        window = [*self.state["global"]["window"], (seed, grad)][-self.defaults["window"]:]
        newest_first = window[::-1]
        beta1, beta2 = self.defaults["betas"]
        # (1−β) cancels in the normalisation, leaving weights βⁱ / Σⱼ βʲ over the window
        w1 = [beta1**i for i in range(len(window))]
        w2 = [beta2**i for i in range(len(window))]
        w1 = [w / sum(w1) for w in w1]
        w2 = [w / sum(w2) for w in w2]
        # K draws per block into cache-resident buffers: serial work (see one_thread)
        with self.phase("update"), one_thread():
            for b in self.blocks(seed):
                b.x.add_(b.z, alpha=eps)  # restore θ
                m, v = self.scratch(b, "m"), self.scratch(b, "v")
                torch.mul(b.z, w1[0] * grad, out=m)
                torch.mul(b.z, b.z, out=v).mul_(w2[0] * grad * grad)
                for i, (past_seed, past_grad) in enumerate(newest_first[1:], start=1):
                    self.draw(b.z, past_seed, b.index, b.block)
                    m.add_(b.z, alpha=w1[i] * past_grad)
                    v.addcmul_(b.z, b.z, value=w2[i] * past_grad * past_grad)
                b.x.addcdiv_(m, v.sqrt_().add_(b.group["adam_eps"]), value=-b.group["lr"])
        self.state["global"]["window"] = window
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus
