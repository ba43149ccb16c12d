"""Each optimizer's update against an explicit float64 reference written from its equations, in float64 and in
half precision.

The references regenerate z by the documented rule (block k of tensor j at step seed s = mix(seed, t) is drawn
from a generator seeded mix(s, j, k), in the compute dtype) and compute losses and updates tensor by tensor,
storing whatever the method claims it need not store (AdaMeZO's past perturbations). In half precision a
reference rounds exactly where the optimizer stores (parameters in their dtype, state in the state dtype) and
computes everything else in float64, so one step must agree within the dtype's resolution.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import pytest
import torch

from reference import FLOAT64, Numerics, gaussian, reference_z
from zomem import optim
from zomem.errors import UsageError
from zomem.optim import (FZOO, LOZO, AdaMeZO, Adam, ForwardGrad, HiZOO, LeZO, LOZOMomentum, MeZO, MeZOSVRG,
                         SparseMeZO, SubZero, ZOAdaMU, ZOAdam, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign, mix)

EPS, SEED = 1e-3, 7
SHAPES = [(5, 4), (7,), (3, 3)]
BLOCKS = pytest.mark.parametrize("block", [4, None], ids=["blocks-of-4", "whole-tensors"])
HALF = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
PLUGIN = "clipped-zo"  # the test plug-in, registered through its entry point
#: the plug-in by its module:Class spec, which loads it whenever its folder is on the path (the registry may have
#: read the entry points before a test put it there)
SPECS = {PLUGIN: "zomem_test_plugin:ClippedZO"}
Tensors = list[torch.Tensor]
#: one step of a reference: (t, θ as stored) -> (θ after the step as stored, the loss the step returns)
Update = Callable[[int, Tensors], tuple[Tensors, float]]


def loss_of(tensors: Tensors) -> torch.Tensor:
    return sum((torch.sin(3 * t) + t**2).sum() for t in tensors)


def grad_of(tensors: Tensors) -> Tensors:
    return [3 * torch.cos(3 * t) + 2 * t for t in tensors]


def start(n: Numerics) -> Tensors:
    generator = torch.Generator().manual_seed(0)
    return n.store([torch.randn(shape, dtype=torch.float64, generator=generator) for shape in SHAPES])


def zeros() -> Tensors:
    return [torch.zeros(s, dtype=torch.float64) for s in SHAPES]


def pair(theta: Tensors, direction: Tensors, n: Numerics) -> tuple[Tensors, float, float]:
    """``evaluate_pair`` as stored: θ+εd, then that −2εd, each rounded. Returns θ−εd as stored, L+ and L−."""
    plus_at = n.store([t + EPS * d for t, d in zip(theta, direction, strict=True)])
    minus_at = n.store([t - 2 * EPS * d for t, d in zip(plus_at, direction, strict=True)])
    return minus_at, float(loss_of(plus_at)), float(loss_of(minus_at))


def moved(theta: Tensors, direction: Tensors, scale: float | list[float], n: Numerics) -> Tensors:
    """θ + scale·d, stored: one in-place add (``scale`` may differ per tensor)."""
    scales = scale if isinstance(scale, list) else [scale] * len(theta)
    return n.store([t + s * d for t, s, d in zip(theta, scales, direction, strict=True)])


def reference_loop(steps: int, update: Update, n: Numerics = FLOAT64) -> tuple[Tensors, list[float]]:
    theta, losses = start(n), []
    for t in range(steps):
        theta, loss = update(t, theta)
        losses.append(loss)
    return theta, losses


def closure_for(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
    """The loss in float64 from the stored parameters (as the workloads compute theirs in float32); first-order
    methods also get its gradients, which autograd rounds to the parameters' dtype."""
    def closure() -> torch.Tensor:
        if optim.forward_only(type(optimizer)):
            return loss_of([p.double() for p in params])
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = loss_of([p.double() for p in params])
            loss.backward()
        return loss.detach()

    return closure


def run(name: str, steps: int, block: int | None, n: Numerics = FLOAT64,
        **hparams: Any) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, list[float]]:
    """The optimizer's own steps from the same start: its parameters, itself and the losses it returned."""
    params = [torch.nn.Parameter(t.to(n.param)) for t in start(n)]
    cls = optim.get(SPECS.get(name, name))
    if issubclass(cls, optim.ZerothOrder):
        hparams = {"seed": SEED, "block_size": block, **hparams}
    optimizer = cls(params, **hparams)
    closure = closure_for(params, optimizer)
    returned = [float(optimizer.step(closure)) for _ in range(steps)]
    return params, optimizer, returned


def assert_same(got: list[torch.nn.Parameter] | Tensors, want: Tensors, dtype: torch.dtype = torch.float64) -> None:
    """float64: g = ΔL/2ε amplifies rounding ~1/ε-fold and still agrees to ~1e-12. Half precision: within the
    dtype's resolution (its machine epsilon, relative), the rounding of stores being the reference's too."""
    for g, w in zip(got, want, strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(g.detach().double(), w, rtol=1e-9, atol=1e-10)
        else:
            torch.testing.assert_close(g.detach().double(), w, rtol=torch.finfo(dtype).eps, atol=1e-6)


# --- the references: each a function of the numerics and the hyper-parameters, returning the step and the state
# it keeps (lists the step updates in place, for the tests to compare) ---


def mezo_reference(n: Numerics, block: int | None, lr: float) -> tuple[Update, dict[str, Tensors]]:
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = n.zs(mix(SEED, t), SHAPES, block)
        at, plus, minus = pair(theta, z, n)
        g = (plus - minus) / (2 * EPS)
        return moved(at, z, EPS - lr * g, n), plus  # restore and update in one add

    return update, {}


def clipped_reference(n: Numerics, block: int | None, lr: float, clip: float) -> tuple[Update, dict[str, Tensors]]:
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = n.zs(mix(SEED, t), SHAPES, block)
        at, plus, minus = pair(theta, z, n)
        g = max(-clip, min(clip, (plus - minus) / (2 * EPS)))
        return moved(at, z, EPS - lr * g, n), plus

    return update, {}


def momentum_reference(n: Numerics, block: int | None, lr: float, momentum: float) -> tuple[Update, dict[str, Tensors]]:
    m = zeros()

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = n.zs(mix(SEED, t), SHAPES, block)
        at, plus, minus = pair(theta, z, n)
        g = (plus - minus) / (2 * EPS)
        work = [momentum * mi + g * zi for mi, zi in zip(m, z, strict=True)]
        m[:] = n.keep(work)
        return moved(moved(at, z, EPS, n), work, -lr, n), plus

    return update, {"momentum": m}


def adam_moments(m: Tensors, v: Tensors, grads: Tensors, b1: float, b2: float,
                 n: Numerics) -> tuple[Tensors, Tensors]:
    """Adam's moments computed exactly and stored rounded; the step uses the exact ones (computed in float32)."""
    m_work = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, grads, strict=True)]
    v_work = [b2 * vi + (1 - b2) * gi**2 for vi, gi in zip(v, grads, strict=True)]
    m[:], v[:] = n.keep(m_work), n.keep(v_work)
    return m_work, v_work


def adam_direction(m_work: Tensors, v_work: Tensors, t: int, b1: float, b2: float, adam_eps: float) -> Tensors:
    """m̂/(√v̂ + eps) at step t (0-based), with Adam's bias corrections."""
    return [mi / (1 - b1 ** (t + 1)) / (vi.sqrt() / math.sqrt(1 - b2 ** (t + 1)) + adam_eps)
            for mi, vi in zip(m_work, v_work, strict=True)]


def zo_adam_reference(n: Numerics, block: int | None, lr: float, betas: tuple[float, float],
                      adam_eps: float) -> tuple[Update, dict[str, Tensors]]:
    m, v = zeros(), zeros()

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = n.zs(mix(SEED, t), SHAPES, block)
        at, plus, minus = pair(theta, z, n)
        g = (plus - minus) / (2 * EPS)
        m_work, v_work = adam_moments(m, v, [g * zi for zi in z], *betas, n)
        return moved(moved(at, z, EPS, n), adam_direction(m_work, v_work, t, *betas, adam_eps), -lr, n), plus

    return update, {"exp_avg": m, "exp_avg_sq": v}


def sign_reference(n: Numerics, block: int | None, lr: float) -> tuple[Update, dict[str, Tensors]]:
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = n.zs(mix(SEED, t), SHAPES, block)
        at, plus, minus = pair(theta, z, n)
        g = (plus - minus) / (2 * EPS)
        return moved(moved(at, z, EPS, n), [torch.sign(g * zi) for zi in z], -lr, n), plus

    return update, {}


def conservative_reference(n: Numerics, block: int | None, lr: float,
                           kept: list[str] | None = None) -> tuple[Update, dict[str, Tensors]]:
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = n.zs(mix(SEED, t), SHAPES, block)
        loss0 = float(loss_of(theta))
        at, plus, minus = pair(theta, z, n)
        g = (plus - minus) / (2 * EPS)
        descent = moved(at, z, EPS - lr * g, n)
        ascent = moved(descent, z, 2 * lr * g, n)
        # ascent first, then descent, then θ: the first of equal losses wins (the authors' tie order)
        candidates = [(float(loss_of(ascent)), 1, "ascent"), (float(loss_of(descent)), -1, "descent"),
                      (loss0, 0, "stay")]
        _, best, label = min(candidates, key=lambda c: c[0])
        if kept is not None:
            kept.append(label)
        return (ascent if best == 1 else moved(ascent, z, (best - 1) * lr * g, n)), loss0

    return update, {}


def forward_grad_reference(n: Numerics, block: int | None, lr: float) -> tuple[Update, dict[str, Tensors]]:
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        v = n.store(n.zs(mix(SEED, t), SHAPES, block))  # a tangent is stored in its primal's dtype
        jvp = float(sum((gi * vi).sum() for gi, vi in zip(grad_of(theta), v, strict=True)))
        return moved(theta, v, -lr * jvp, n), float(loss_of(theta))

    return update, {}


def reference_anneal(t: int, t1: float, t2: float) -> tuple[float, float, float]:
    """The documented schedule, written out: 1 until T1, a half cosine down to (0.5, 0.9, 0.01) at T2."""
    finals = (0.5, 0.9, 0.01)
    if t < t1:
        return 1.0, 1.0, 1.0
    progress = min((t - t1) / (t2 - t1), 1.0)
    return tuple(f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress)) for f in finals)  # type: ignore[return-value]


def zo_adamu_reference(n: Numerics, block: int | None, lr: float, sigma: float, t1: float,
                       t2: float) -> tuple[Update, dict[str, Tensors]]:
    h = zeros()

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        alpha, beta1, beta2 = reference_anneal(t, t1, t2)
        s = mix(SEED, t)
        z_dot = [math.sqrt(alpha) * z for z in n.zs(s, SHAPES, block)]
        if alpha == 1.0:
            z_ddot = list(h)  # N(h, 0): the warm-up draws no second noise
        else:
            z_ddot = [hi + math.sqrt(1 - alpha) * e for hi, e in zip(h, n.zs(mix(s, 1), SHAPES, block), strict=True)]
        m = [beta1 * a + (1 - beta1) * b for a, b in zip(z_dot, z_ddot, strict=True)]
        v = [beta2 * a**2 + (1 - beta2) * b**2 for a, b in zip(z_dot, z_ddot, strict=True)]
        at, plus, minus = pair(theta, m, n)
        g = (plus - minus) / (2 * EPS)
        h[:] = n.keep(m)
        step = [mi / (vi + sigma).sqrt() for mi, vi in zip(m, v, strict=True)]
        return moved(moved(at, m, EPS, n), step, -lr * g, n), plus

    return update, {"perturbation_momentum": h}


def hizoo_reference(n: Numerics, block: int | None, lr: float,
                    hessian_smooth: float) -> tuple[Update, dict[str, Tensors]]:
    hessian = [torch.ones(s, dtype=torch.float64) for s in SHAPES]

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = n.zs(mix(SEED, t), SHAPES, block)
        loss0 = float(loss_of(theta))
        probe = [zi / hi.sqrt() for zi, hi in zip(z, hessian, strict=True)]
        at, plus, minus = pair(theta, probe, n)
        curvature = abs(plus + minus - 2 * loss0) / (2 * EPS**2)
        # (1−α)H + α·Ĥ with Ĥ = c·H⊙z²; θ is updated with the new H, as computed (before it is stored)
        work = [hi * (1 - hessian_smooth + hessian_smooth * curvature * zi**2)
                for hi, zi in zip(hessian, z, strict=True)]
        hessian[:] = n.keep(work)
        g = (plus - minus) / (2 * EPS)
        step = [zi / wi.sqrt() for zi, wi in zip(z, work, strict=True)]
        return moved(moved(at, probe, EPS, n), step, -lr * g, n), loss0

    return update, {"hessian": hessian}


def adamezo_reference(n: Numerics, block: int | None, lr: float, window: int, betas: tuple[float, float],
                      adam_eps: float,
                      past: list[tuple[float, Tensors]] | None = None) -> tuple[Update, dict[str, Tensors]]:
    past = [] if past is None else past  # newest first: the K perturbations AdaMeZO does not store
    b1, b2 = betas

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = n.zs(mix(SEED, t), SHAPES, block)
        at, plus, minus = pair(theta, z, n)
        g = (plus - minus) / (2 * EPS)
        past.insert(0, (g, z))
        del past[window:]
        w1 = [(1 - b1) * b1**i for i in range(len(past))]
        w2 = [(1 - b2) * b2**i for i in range(len(past))]
        step = []
        for j in range(len(SHAPES)):
            m = sum(w * gi * zi[j] for w, (gi, zi) in zip(w1, past, strict=True)) / sum(w1)
            v = sum(w * (gi * zi[j]) ** 2 for w, (gi, zi) in zip(w2, past, strict=True)) / sum(w2)
            step.append(m / (v.sqrt() + adam_eps))
        return moved(moved(at, z, EPS, n), step, -lr, n), plus

    return update, {}


def sgd_reference(n: Numerics, block: int | None, lr: float, momentum: float,
                  weight_decay: float) -> tuple[Update, dict[str, Tensors]]:
    buffers = zeros()

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        grads = n.store(grad_of(theta))  # autograd rounds a gradient to its parameter's dtype
        d = [g + weight_decay * th for g, th in zip(grads, theta, strict=True)]
        if t > 0:
            d = [di + momentum * b for di, b in zip(d, buffers, strict=True)]
        buffers[:] = n.keep(d)
        return moved(theta, d, -lr, n), float(loss_of(theta))

    return update, {"momentum_buffer": buffers}


def adam_reference(n: Numerics, block: int | None, lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> tuple[Update, dict[str, Tensors]]:
    """torch's fused AdamW: decoupled decay, moments and step computed in float32 in one kernel, stored once."""
    m, v = zeros(), zeros()

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        grads = n.store(grad_of(theta))  # autograd rounds a gradient to its parameter's dtype
        m_work, v_work = adam_moments(m, v, grads, *betas, n)
        decayed = [th * (1 - lr * weight_decay) for th in theta]
        direction = adam_direction(m_work, v_work, t, *betas, eps)
        return n.store([d - lr * s for d, s in zip(decayed, direction, strict=True)]), float(loss_of(theta))

    return update, {"exp_avg": m, "exp_avg_sq": v}


def row_blocks(shape: tuple[int, ...], block: int | None) -> int | None:
    """Rows per block of a matrix walked in whole rows (None: the whole matrix is one block)."""
    return max(1, block // shape[1]) if block else None


def lozo_factors(n: Numerics, t: int, block: int | None, rank: int,
                 interval: int) -> tuple[dict[int, Tensors], Tensors]:
    """Each matrix's (U, V) at step t (U drawn per block of rows, V from the seed of step t − t mod ν) and the
    perturbation of every tensor: U·Vᵀ for matrices, z for the others."""
    s, refresh = mix(SEED, t), mix(SEED, t - t % interval)
    z = n.zs(s, SHAPES, block)
    factors, directions = {}, []
    for j, shape in enumerate(SHAPES):
        if len(shape) != 2:
            directions.append(z[j])
            continue
        per = row_blocks(shape, block)
        u = reference_z(s, j, (shape[0], rank), per and per * rank, n.draw)
        v = gaussian(mix(refresh, j, -1), (shape[1], rank), n.draw)
        factors[j] = [u, v]
        directions.append(u @ v.T)
    return factors, directions


def lozo_reference(n: Numerics, block: int | None, lr: float, rank: int,
                   interval: int) -> tuple[Update, dict[str, Tensors]]:
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        _, d = lozo_factors(n, t, block, rank, interval)
        at, plus, minus = pair(theta, d, n)
        g = (plus - minus) / (2 * EPS)
        scales = [EPS - lr * g / rank if len(shape) == 2 else EPS - lr * g for shape in SHAPES]
        return moved(at, d, scales, n), plus  # restore and update in one add

    return update, {}


def lozo_m_reference(n: Numerics, block: int | None, lr: float, rank: int, interval: int,
                     momentum: float) -> tuple[Update, dict[str, Tensors]]:
    kept = [torch.zeros(s[0], rank, dtype=torch.float64) if len(s) == 2 else torch.zeros(s, dtype=torch.float64)
            for s in SHAPES]

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        factors, d = lozo_factors(n, t, block, rank, interval)
        at, plus, minus = pair(theta, d, n)
        g = (plus - minus) / (2 * EPS)
        steps = []
        for j, shape in enumerate(SHAPES):
            if len(shape) != 2:
                work = momentum * kept[j] + (1 - momentum) * g * d[j]
                kept[j] = n.keep([work])[0]
                steps.append(work)
                continue
            u, v = factors[j]
            carried = kept[j]
            if t > 0 and t % interval == 0:  # V was redrawn: carry N into the new subspace
                old = gaussian(mix(mix(SEED, t - interval), j, -1), (shape[1], rank), n.draw)
                carried = carried @ (old.T @ v / shape[1])
            work = momentum * carried + (1 - momentum) * g * u
            kept[j] = n.keep([work])[0]
            steps.append(work @ v.T / rank)
        return moved(moved(at, d, EPS, n), steps, -lr, n), plus

    return update, {"momentum": kept}


def subzero_reference(n: Numerics, block: int | None, lr: float, rank: int,
                      interval: int) -> tuple[Update, dict[str, Tensors]]:
    subspaces: dict[int, Tensors] = {}

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        s = mix(SEED, t)
        z = n.zs(s, SHAPES, block)
        d = []
        for j, shape in enumerate(SHAPES):
            if len(shape) != 2:
                d.append(z[j])
                continue
            r = min(rank, *shape)
            if t % interval == 0:  # orthonormal U, V: QR (in the compute dtype) of Gaussian matrices, kept
                subspaces[j] = [n.keep([torch.linalg.qr(gaussian(mix(s, j, stream), (side, r), n.draw).to(n.draw)).Q
                                        .double()])[0] for stream, side in ((-1, shape[0]), (-2, shape[1]))]
            u, v = subspaces[j]
            core = gaussian(mix(s, j, -3), (r, r), n.draw) * math.sqrt(shape[0] * shape[1]) / r
            d.append(u @ core @ v.T)
        at, plus, minus = pair(theta, d, n)
        g = (plus - minus) / (2 * EPS)
        return moved(at, d, EPS - lr * g, n), plus

    return update, {}


def sparse_mezo_reference(n: Numerics, block: int | None, lr: float,
                          sparsity: float) -> tuple[Update, dict[str, Tensors]]:
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = n.zs(mix(SEED, t), SHAPES, block)
        d = []
        for th, zi in zip(theta, z, strict=True):
            # the tensors are small: the threshold is the exact (1 − s)-quantile of |θ|
            k = max(1, math.ceil((1 - sparsity) * th.numel()))
            h = th.abs().flatten().kthvalue(k).values
            d.append(zi * (th.abs() <= h))
        at, plus, minus = pair(theta, d, n)
        g = (plus - minus) / (2 * EPS)
        return moved(at, d, EPS - lr * g, n), plus

    return update, {}


def lezo_reference(n: Numerics, block: int | None, lr: float, sparsity: float) -> tuple[Update, dict[str, Tensors]]:
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        s = mix(SEED, t)
        # unnamed tensors: each is a layer; round((1 − ρ)·3) of them drawn from the step's seed
        keep = max(1, round((1 - sparsity) * len(SHAPES)))
        chosen = torch.randperm(len(SHAPES), generator=torch.Generator().manual_seed(mix(s, 1)))[:keep].tolist()
        z = [zi if j in chosen else torch.zeros_like(zi) for j, zi in enumerate(n.zs(s, SHAPES, block))]
        at, plus, minus = pair(theta, z, n)
        g = (plus - minus) / (2 * EPS)
        return moved(at, z, EPS - lr * g, n), plus

    return update, {}


def fzoo_reference(n: Numerics, block: int | None, lr: float, eps: float,
                   probes: int) -> tuple[Update, dict[str, Tensors]]:
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        s = mix(SEED, t)
        loss0 = float(loss_of(theta))
        signs, losses = [], []
        for i in range(probes):
            u = [reference_z(mix(s, i), j, shape, block, n.draw, signs=True) for j, shape in enumerate(SHAPES)]
            losses.append(float(loss_of(moved(theta, u, eps, n))))
            theta = moved(moved(theta, u, eps, n), u, -eps, n)
            signs.append(u)
        spread = statistics.pstdev(losses)
        coefficients = [(loss - loss0) / (probes * spread) for loss in losses]
        total = [sum(c * u[j] for c, u in zip(coefficients, signs, strict=True)) for j in range(len(SHAPES))]
        return moved(theta, total, -lr, n), loss0

    return update, {}


def mezo_svrg_reference(n: Numerics, block: int | None, lr: float, snapshot_lr: float,
                        q: int) -> tuple[Update, dict[str, Tensors]]:
    snapshot, estimate = zeros(), zeros()

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        s = mix(SEED, t)
        z = n.zs(s, SHAPES, block)
        at, plus, minus = pair(theta, z, n)
        g = (plus - minus) / (2 * EPS)
        if t % q == 0:  # ḡ ← ĝ(θ; z̄), θ̄ ← θ, θ −= η̄·ḡ
            restored = moved(at, z, EPS, n)
            work = [g * zi for zi in z]
            snapshot[:], estimate[:] = n.keep(restored), n.keep(work)
            return moved(restored, work, -snapshot_lr, n), plus
        # θ̄ ± εz′ (θ̄ as kept), then θ − η·(ĝ(θ; z) − ĝ(θ̄; z′) + ḡ), θ as the snapshot's
        # storage kept it
        other = n.zs(mix(s, 1), SHAPES, block)
        current = n.keep([a + EPS * zi for a, zi in zip(at, z, strict=True)])
        snap_at, snap_plus, snap_minus = pair(snapshot, other, n)
        snap_g = (snap_plus - snap_minus) / (2 * EPS)
        step = [g * zi - snap_g * oi + e for zi, oi, e in zip(z, other, estimate, strict=True)]
        snapshot[:] = n.keep([a + EPS * oi for a, oi in zip(snap_at, other, strict=True)])
        return moved(n.store(current), step, -lr, n), plus

    return update, {"snapshot": snapshot, "estimate": estimate}


# --- first-order methods that save memory: each parameter's update written out per tensor, in float64 where the
# method computes in float32 or wider, and rounded where it stores ---


def rms(t: torch.Tensor) -> float:
    return float(t.norm() / math.sqrt(t.numel()))


def lomo_reference(n: Numerics, block: int | None, lr: float, weight_decay: float) -> tuple[Update, dict[str, Tensors]]:
    """SGD applied in backward: θ(1 − ηλ) − ηg, computed in float32 or wider and stored once."""
    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        grads = n.store(grad_of(theta))
        return n.store([th * (1 - lr * weight_decay) - lr * g for th, g in zip(theta, grads, strict=True)]), \
            float(loss_of(theta))

    return update, {}


def adalomo_reference(n: Numerics, block: int | None, lr: float, weight_decay: float, clip_threshold: float,
                      decay_rate: float, eps: tuple[float, float]) -> tuple[Update, dict[str, Tensors]]:
    """AdaLomo's update per tensor; its factors are kept in the compute dtype (float32 beside half weights)."""
    factors: dict[int, Tensors] = {}

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        beta = 1 - (t + 1) ** decay_rate
        out = []
        for j, (th, g) in enumerate(zip(theta, n.store(grad_of(theta)), strict=True)):
            squared = g**2 + eps[0]
            if th.ndim == 2:
                r, c = factors.get(j, [torch.zeros(th.shape[0], dtype=torch.float64),
                                       torch.zeros(th.shape[1], dtype=torch.float64)])
                r, c = beta * r + (1 - beta) * squared.mean(1), beta * c + (1 - beta) * squared.mean(0)
                factors[j] = [x.to(n.draw).double() for x in (r, c)]
                r, c = factors[j]
                u = g / (torch.outer(r, c) / r.mean()).sqrt()
            else:
                (v,) = factors.get(j, [torch.zeros_like(th)])
                factors[j] = [(beta * v + (1 - beta) * squared).to(n.draw).double()]
                u = g / factors[j][0].sqrt()
            u = u / max(1.0, rms(u) / clip_threshold)
            step = lr * max(eps[1], rms(th))
            out.append(th * (1 - step * weight_decay) - step * u)
        return n.store(out), float(loss_of(theta))

    return update, {}


def adafactor_reference(n: Numerics, block: int | None, lr: float, beta2_decay: float, d: float,
                        weight_decay: float) -> tuple[Update, dict[str, Tensors]]:
    """torch's Adafactor as its documentation writes it: ρ = min(lr, 1/√t), α = max(ε₂, RMS(θ))·ρ, factors
    moved
    toward the row and column means of g² by t^beta2_decay, ε₁ the weights' machine epsilon."""
    factors: dict[int, Tensors] = {}

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        step = t + 1
        weight = step**beta2_decay
        eps1 = torch.finfo(n.param).eps
        out = []
        for j, (th, g) in enumerate(zip(theta, n.store(grad_of(theta)), strict=True)):
            alpha = max(1e-3, rms(th)) * min(lr, 1 / math.sqrt(step))
            means = [(g**2).mean(1), (g**2).mean(0)] if th.ndim == 2 else [g**2]
            kept = factors.get(j, [torch.zeros_like(x) for x in means])
            factors[j] = n.keep([torch.lerp(k, x, weight) for k, x in zip(kept, means, strict=True)])
            if th.ndim == 2:
                r, c = factors[j]
                estimate = torch.outer(r, c) / max(float(r.mean()), eps1)
            else:
                estimate = factors[j][0]
            u = estimate.clamp(min=eps1 * eps1).rsqrt() * g
            out.append(th * (1 - lr * weight_decay) - alpha / max(1.0, rms(u) / d) * u)
        return n.store(out), float(loss_of(theta))

    return update, {}


def galore_projector(grad: torch.Tensor, rank: int) -> tuple[torch.Tensor, bool]:
    """GaLore's ``std`` projector of a gradient, from its SVD in float32 (as galore-torch computes it): Vᵀ[:r] for a
    matrix with at least as many rows as columns (projected on the right), else U[:, :r]."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    right = grad.shape[0] >= grad.shape[1]
    return (vh[:rank] if right else u[:, :rank]).double(), right


def galore_reference(n: Numerics, block: int | None, lr: float, betas: tuple[float, float], eps: float,
                     weight_decay: float, rank: int, update_proj_gap: int,
                     scale: float) -> tuple[Update, dict[str, Tensors]]:
    """Adam (bias-corrected step size, ε outside the root) on R = G·Pᵀ or Pᵀ·G for each matrix, the update
    projected
    back and scaled; plain Adam on the vector; decoupled weight decay applied last, to the updated weights."""
    b1, b2 = betas
    projectors: dict[int, tuple[torch.Tensor, bool]] = {}
    moments: dict[int, Tensors] = {}

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        out = []
        for j, (th, g) in enumerate(zip(theta, n.store(grad_of(theta)), strict=True)):
            if th.ndim == 2 and t % update_proj_gap == 0:
                projectors[j] = galore_projector(g, rank)
            if th.ndim == 2:
                p, right = projectors[j]
                low = g @ p.T if right else p.T @ g
            else:
                low = g
            m, v = moments.get(j, [torch.zeros_like(low), torch.zeros_like(low)])
            m, v = n.keep([b1 * m + (1 - b1) * low, b2 * v + (1 - b2) * low**2])
            moments[j] = [m, v]
            step_size = lr * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
            direction = m / (v.sqrt() + eps)
            if th.ndim == 2:
                p, right = projectors[j]
                direction = (direction @ p if right else p @ direction) * scale
            moved = n.store([th - step_size * direction])[0]
            out.append(moved - lr * weight_decay * moved)
        return n.store(out), float(loss_of(theta))

    return update, {}


def quantised(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """``x`` as bitsandbytes stores a moment: blockwise (256) on its dynamic 8-bit map, read back as float64."""
    import bitsandbytes.functional as bnb

    code = bnb.create_dynamic_map(signed=signed)
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise(x.float().flatten(), code, 256)
    return torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, code, 256, torch.float32).double().view(x.shape)


def adamw_8bit_reference(n: Numerics, block: int | None, lr: float, betas: tuple[float, float], eps: float,
                         weight_decay: float, min_8bit_size: int) -> tuple[Update, dict[str, Tensors]]:
    """AdamW (decoupled decay first, ε outside the bias-corrected root) whose two moments are stored 8-bit: each step
    reads them back, updates them exactly and stores them quantised again."""
    b1, b2 = betas
    m, v = zeros(), zeros()

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        grads = n.store(grad_of(theta))
        out = []
        for j, (th, g) in enumerate(zip(theta, grads, strict=True)):
            m_work, v_work = b1 * m[j] + (1 - b1) * g, b2 * v[j] + (1 - b2) * g**2
            denom = v_work.sqrt() / math.sqrt(1 - b2 ** (t + 1)) + eps
            out.append(th * (1 - lr * weight_decay) - lr / (1 - b1 ** (t + 1)) * m_work / denom)
            m[j], v[j] = quantised(m_work, signed=True), quantised(v_work, signed=False)
        return n.store(out), float(loss_of(theta))

    return update, {}


def adam_mini_reference(n: Numerics, block: int | None, lr: float, betas: tuple[float, float], eps: float,
                        weight_decay: float) -> tuple[Update, dict[str, Tensors]]:
    """Adam-mini on tensors without names: one second moment per tensor (the mean of g²), Adam's first moment, weight
    decay first; computed in the weights' dtype by the package."""
    b1, b2 = betas
    m = zeros()
    v = [0.0] * len(SHAPES)

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        out = []
        for j, (th, g) in enumerate(zip(theta, n.store(grad_of(theta)), strict=True)):
            m[j] = n.keep([b1 * m[j] + (1 - b1) * g])[0]
            v[j] = b2 * v[j] + (1 - b2) * float((g**2).mean())
            h = math.sqrt(v[j]) / math.sqrt(1 - b2 ** (t + 1)) + eps
            out.append(th * (1 - lr * weight_decay) - lr / (1 - b1 ** (t + 1)) / h * m[j])
        return n.store(out), float(loss_of(theta))

    return update, {}


#: every registered optimizer (and the test plug-in) with its reference and the hyper-parameters it is tested at
REFERENCES: dict[str, tuple[Callable[..., tuple[Update, dict[str, Tensors]]], dict[str, Any]]] = {
    "mezo": (mezo_reference, {"lr": 0.05}),
    PLUGIN: (clipped_reference, {"lr": 0.05, "clip": 3.0}),
    "zo-sgd-mmt": (momentum_reference, {"lr": 0.05, "momentum": 0.8}),
    "zo-adam": (zo_adam_reference, {"lr": 0.05, "betas": (0.8, 0.9), "adam_eps": 1e-8}),
    "zo-sgd-sign": (sign_reference, {"lr": 0.05}),
    "zo-sgd-cons": (conservative_reference, {"lr": 0.02}),
    "forward-grad": (forward_grad_reference, {"lr": 0.05}),
    "zo-adamu": (zo_adamu_reference, {"lr": 0.01, "sigma": 1e-8, "t1": 1, "t2": 3}),
    "hizoo": (hizoo_reference, {"lr": 0.05, "hessian_smooth": 0.1}),
    "adamezo": (adamezo_reference, {"lr": 0.05, "window": 3, "betas": (0.7, 0.9), "adam_eps": 1e-8}),
    "sgd": (sgd_reference, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1}),
    "adam": (adam_reference, {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-8, "weight_decay": 0.1}),
    "lozo": (lozo_reference, {"lr": 0.05, "rank": 2, "interval": 2}),
    "lozo-m": (lozo_m_reference, {"lr": 0.05, "rank": 2, "interval": 2, "momentum": 0.8}),
    "subzero": (subzero_reference, {"lr": 0.05, "rank": 2, "interval": 2}),
    "sparse-mezo": (sparse_mezo_reference, {"lr": 0.05, "sparsity": 0.5}),
    "lezo": (lezo_reference, {"lr": 0.05, "sparsity": 0.5}),
    "fzoo": (fzoo_reference, {"lr": 0.05, "eps": EPS, "probes": 4}),
    "mezo-svrg": (mezo_svrg_reference, {"lr": 0.02, "snapshot_lr": 0.05, "q": 2}),
    "lomo": (lomo_reference, {"lr": 0.05, "weight_decay": 0.1}),
    "adalomo": (adalomo_reference, {"lr": 0.05, "weight_decay": 0.1, "clip_threshold": 1.0, "decay_rate": -0.8,
                                    "eps": (1e-30, 1e-3)}),
    "adafactor": (adafactor_reference, {"lr": 0.05, "beta2_decay": -0.8, "d": 1.0, "weight_decay": 0.1}),
    "galore": (galore_reference, {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1, "rank": 2,
                                  "update_proj_gap": 2, "scale": 0.25}),
    # min_8bit_size=0: the test's small tensors stored in 8 bits too (bitsandbytes keeps float32 below 4096 elements)
    "adamw-8bit": (adamw_8bit_reference, {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-8, "weight_decay": 0.1,
                                          "min_8bit_size": 0}),
    "adam-mini": (adam_mini_reference, {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-8, "weight_decay": 0.1}),
}
#: hyper-parameters a reference takes that the optimizer does not (ZO-AdaMU's schedule needs its total)
EXTRA = {"zo-adamu": {"total_steps": 5}}
#: packages that compute in float32 whatever the weights' dtype (bitsandbytes' kernels): float64 weights agree with
#: the float64 reference to float32's resolution
FLOAT32_ARITHMETIC = {"adamw-8bit"}
#: packages that compute in the weights' dtype (torch's Adafactor): a half step's arithmetic rounds in half, so the
#: update is within a few of the dtype's epsilons of itself (an lr-sized quantity), beside the stored result's rounding
HALF_ARITHMETIC = {"adafactor"}
#: combinations an optimizer refuses, with what the refusal says
REFUSED_HALF = {("adam-mini", torch.float16): "zero gradient gives NaN"}


def run_against_reference(name: str, steps: int, block: int | None,
                          n: Numerics) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, list[float],
                                                Tensors, list[float], dict[str, Tensors]]:
    """The optimizer's steps and its reference's, from the same start."""
    factory, hparams = REFERENCES[name]
    update, state = factory(n, block, **hparams)
    want, losses = reference_loop(steps, update, n)
    extra = {"state_dtype": str(n.state).removeprefix("torch.")} if n.state else {}
    params, optimizer, returned = run(name, steps, block, n, **hparams, **EXTRA.get(name, {}), **extra)
    return params, optimizer, returned, want, losses, state


def test_every_registered_optimizer_has_a_reference(plugin_path: object) -> None:
    assert set(optim.BUILTIN) - {"inference"} | {PLUGIN} == set(REFERENCES)
    assert set(optim.OPTIMIZERS.names()) - {"inference"} <= set(REFERENCES)  # plug-ins present when registered


@pytest.mark.parametrize("name", list(REFERENCES))
@BLOCKS
def test_float64_steps_match_the_reference(name: str, block: int | None, plugin_path: object) -> None:
    params, optimizer, returned, want, losses, state = run_against_reference(name, 3, block, FLOAT64)
    float32 = name in FLOAT32_ARITHMETIC
    assert_same(params, want, torch.float32 if float32 else torch.float64)
    assert returned == pytest.approx(losses, rel=1e-6 if float32 else 1e-10)
    for key, values in state.items():
        # HiZOO's curvature divides by 2ε², amplifying rounding ~1e6-fold: still ~1e-9 in float64
        for got, w in zip([optimizer.state[p][key] for p in params], values, strict=True):
            torch.testing.assert_close(got, w, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", list(REFERENCES))
@BLOCKS
@HALF
def test_one_half_precision_step_matches_the_reference(name: str, block: int | None, dtype: torch.dtype,
                                                       plugin_path: object) -> None:
    if (name, dtype) in REFUSED_HALF:
        with pytest.raises(UsageError, match=REFUSED_HALF[name, dtype]):
            optim.create(name, [torch.nn.Parameter(torch.zeros(2, dtype=dtype))])
        return
    n = Numerics(dtype)
    params, optimizer, returned, want, losses, state = run_against_reference(name, 1, block, n)
    assert all(p.dtype == dtype for p in params)
    if name in HALF_ARITHMETIC:
        for got, w in zip(params, want, strict=True):
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(got.detach().double(), w, rtol=eps, atol=4 * eps * REFERENCES[name][1]["lr"])
    else:
        assert_same(params, want, dtype)
    assert returned == pytest.approx(losses, rel=1e-6)
    for key, values in state.items():
        stored = [optimizer.state[p][key] for p in params]
        assert all(s.dtype == dtype for s in stored), f"{key} is stored in the parameters' dtype by default"
        assert_same(stored, values, dtype)


#: hyper-parameters at which 20 steps on 65,536 weights move every method by more than rounding and stay stable
#: (HiZOO with float32 state: half state cannot hold an increment of α·c·z² ~ 1e-6 at 1.0)
LONG_RUN = {
    "mezo": {"lr": 1e-3}, PLUGIN: {"lr": 1e-3}, "zo-sgd-mmt": {"lr": 1e-4}, "zo-adam": {"lr": 1e-3},
    "zo-sgd-sign": {"lr": 1e-3}, "zo-sgd-cons": {"lr": 1e-3}, "forward-grad": {"lr": 1e-3},
    "zo-adamu": {"lr": 1e-3, "total_steps": 20, "t1": 5}, "hizoo": {"lr": 1e-3, "state_dtype": "float32"},
    "adamezo": {"lr": 1e-3}, "sgd": {"lr": 0.1}, "adam": {"lr": 1e-3}, "inference": {},
    # SubZero's U, V and MeZO-SVRG's snapshot move only when redrawn: redraw them at the last step too; Sparse MeZO
    # moves the smallest (1 − s) of the weights: s = 0.25 lets most of them move
    "lozo": {"lr": 1e-3}, "lozo-m": {"lr": 1e-3}, "subzero": {"lr": 1e-3, "interval": 1},
    "sparse-mezo": {"lr": 1e-3, "sparsity": 0.25}, "lezo": {"lr": 1e-3}, "fzoo": {"lr": 1e-3},
    "mezo-svrg": {"lr": 1e-3, "q": 19},
    # steps that move bfloat16 weights of 0.1 (its spacing there is 5e-4): AdaLomo's and Adafactor's scale with
    # RMS(θ) = 0.1, GaLore's with its scale of 0.25
    "lomo": {"lr": 0.1}, "adalomo": {"lr": 1e-2}, "adafactor": {"lr": 1e-2}, "galore": {"lr": 1e-2},
    "adamw-8bit": {"lr": 1e-3}, "adam-mini": {"lr": 1e-3},
}
#: state that never moves: bitsandbytes keeps its quantisation maps in each parameter's state
CONSTANT_STATE = {"qmap1", "qmap2"}
#: state kept in a half dtype that stops moving: torch keeps Adafactor's factors in the weights' dtype, and by step 20
#: its lerp weight t^-0.8 ≈ 0.09 moves them by less than bfloat16's spacing (the weights still move)
FROZEN_HALF_STATE = {("adafactor", torch.bfloat16)}
#: the loss is a sum over the weights divided by √n, so the projected gradient g = ∇L·z is O(1), as in fine-tuning
SCALE = 1 / 256


@pytest.mark.parametrize("name", list(LONG_RUN))
@HALF
def test_twenty_half_precision_steps_stay_finite_and_move(name: str, dtype: torch.dtype, plugin_path: object) -> None:
    generator = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter((0.1 * torch.randn(256, 256, generator=generator)).to(dtype))]
    if (name, dtype) in REFUSED_HALF:
        with pytest.raises(UsageError, match=REFUSED_HALF[name, dtype]):
            optim.create(name, params, **LONG_RUN[name])
        return
    start = params[0].detach().clone()
    optimizer = optim.create(SPECS.get(name, name), params, **LONG_RUN[name])
    forward_only = optim.forward_only(type(optimizer))

    def closure() -> torch.Tensor:  # the loss in float32, as the workloads compute theirs
        if forward_only:
            return SCALE * (torch.sin(3 * params[0].float()) + params[0].float() ** 2).sum()
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = SCALE * (torch.sin(3 * params[0].float()) + params[0].float() ** 2).sum()
            loss.backward()
        return loss.detach()

    states = []
    for _ in range(20):
        optimizer.step(closure)
        states.append({k: v.clone() for k, v in optimizer.state[params[0]].items() if isinstance(v, torch.Tensor)})
    assert params[0].dtype == dtype and torch.isfinite(params[0]).all()
    if name == "inference":
        return
    assert (params[0] != start).float().mean() > 0.5, "most weights should have moved"
    for key, value in states[-1].items():
        assert torch.isfinite(value).all(), key
        if value.numel() > 1 and key not in CONSTANT_STATE and (name, dtype) not in FROZEN_HALF_STATE:
            assert not torch.equal(value, states[-2][key]), f"{key} should move in the last step"


def test_hizoo_hessian_moves_with_half_weights_and_float32_state() -> None:
    # mean(θ²): curvature c ≈ 1, so α·c·z² ~ 1e-6, far below float16's resolution at 1.0 but not float32's
    param = torch.nn.Parameter((0.1 * torch.randn(4096, generator=torch.Generator().manual_seed(2))).half())
    optimizer = HiZOO([param], lr=1e-6, state_dtype="float32")
    for _ in range(10):
        optimizer.step(lambda: (param.float() ** 2).mean())
    hessian = optimizer.state[param]["hessian"]
    assert hessian.dtype == torch.float32 and (hessian != 1.0).float().mean() > 0.9
    assert (hessian - 1).abs().max() < 1e-3, "the increments are below float16's resolution at 1.0"


def test_zo_adamu_reference_passes_through_warm_up_annealing_and_final() -> None:
    params, optimizer, returned, want, losses, state = run_against_reference("zo-adamu", 5, 4, FLOAT64)
    assert_same(params, want)
    alphas = [reference_anneal(t, 1, 3)[0] for t in range(5)]
    assert alphas[0] == 1.0 and 0.5 < alphas[2] < 1.0 and alphas[4] == 0.5


def test_zo_sgd_conservative_exercises_more_than_one_choice() -> None:
    kept: list[str] = []
    update, _ = conservative_reference(FLOAT64, None, 0.02, kept)
    want, _ = reference_loop(8, update)
    params, _, _ = run("zo-sgd-cons", 8, None, lr=0.02)
    assert_same(params, want)
    assert len(set(kept)) >= 2, f"the reference should exercise more than one choice, kept {kept}"


def test_hizoo_hessian_moves() -> None:
    params, optimizer, *_ = run_against_reference("hizoo", 3, None, FLOAT64)
    assert not all(torch.allclose(optimizer.state[p]["hessian"], torch.ones_like(p)) for p in params)


def test_adamezo_keeps_only_its_window() -> None:
    past: list[tuple[float, Tensors]] = []
    update, _ = adamezo_reference(FLOAT64, None, 0.05, 3, (0.7, 0.9), 1e-8, past)
    want, _ = reference_loop(6, update)
    params, optimizer, _ = run("adamezo", 6, None, lr=0.05, window=3, betas=(0.7, 0.9), adam_eps=1e-8)
    assert_same(params, want)
    saved = optimizer.state["global"]["window"]
    assert [s for s, _ in saved] == [mix(SEED, t) for t in (3, 4, 5)]
    assert [g for _, g in saved] == pytest.approx([g for g, _ in reversed(past)], rel=1e-9)
    assert optimizer.state_bytes() == 0


def test_forward_grad_keeps_no_state() -> None:
    _, optimizer, _ = run("forward-grad", 2, None, lr=0.05)
    assert optimizer.state_bytes() == 0


def test_forward_grad_refuses_a_loss_without_a_tangent() -> None:
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = ForwardGrad([param])
    with pytest.raises(RuntimeError, match="no tangent"):
        optimizer.step(lambda: (param.detach() ** 2).sum())


def test_mezo_weight_decay_skips_biases_and_norms() -> None:
    lr, decay = 0.05, 0.1
    named = [("w", torch.randn(5, 4, dtype=torch.float64)), ("b", torch.randn(7, dtype=torch.float64))]
    params = [torch.nn.Parameter(t.clone()) for _, t in named]
    optimizer = MeZO(optim.decay_groups(zip(["w", "b"], params, strict=True)), lr=lr, weight_decay=decay, seed=SEED)
    z = FLOAT64.zs(mix(SEED, 0), [t.shape for _, t in named], None)
    plus = float(loss_of([t + EPS * zi for (_, t), zi in zip(named, z, strict=True)]))
    minus = float(loss_of([t - EPS * zi for (_, t), zi in zip(named, z, strict=True)]))
    g = (plus - minus) / (2 * EPS)
    optimizer.step(lambda: loss_of(list(params)))
    # the matrix decays, the vector (a bias) does not
    for param, (_, t), zi, lam in zip(params, named, z, (decay, 0.0), strict=True):
        torch.testing.assert_close(param.detach(), t - lr * (g * zi + lam * t), rtol=1e-9, atol=1e-10)


def test_zo_adamu_schedule_values() -> None:
    total = 20_000
    t1, t2 = 1024, 0.8 * total
    schedule = ZOAdaMU([torch.nn.Parameter(torch.zeros(2))], total_steps=total).schedule
    expected = {0: (1.0, 1.0, 1.0), t1: (1.0, 1.0, 1.0), (t1 + t2) / 2: (0.75, 0.95, 0.505),
                t2: (0.5, 0.9, 0.01), total: (0.5, 0.9, 0.01)}
    for t, values in expected.items():
        assert schedule(t) == pytest.approx(values, abs=1e-12), f"t={t}"
        assert reference_anneal(t, t1, t2) == pytest.approx(values, abs=1e-12)


def test_zo_adamu_schedule_is_replaceable() -> None:
    asked = []

    def constant(t: int) -> tuple[float, float, float]:
        asked.append(t)
        return 0.5, 0.9, 0.01

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = ZOAdaMU([param], schedule=constant)
    for _ in range(3):
        optimizer.step(lambda: (param**2).sum())
    assert asked[:1] == [0] and sorted(set(asked)) == [0, 1, 2]


@pytest.mark.parametrize("cls,bad", [
    (ZOSGDMomentum, {"momentum": 1.0}), (ZOSGDMomentum, {"state_dtype": "float8"}), (ZOAdam, {"betas": (0.9, 1.5)}),
    (ZOAdam, {"adam_eps": 0.0}), (ZOSGDSign, {"eps": -1.0}), (ZOSGDConservative, {"lr": -0.1}),
    (ForwardGrad, {"lr": -1.0}), (ZOAdaMU, {"t1": 2000, "total_steps": 1000}), (ZOAdaMU, {"sigma": 0.0}),
    (HiZOO, {"hessian_smooth": 2.0}), (AdaMeZO, {"window": 0}), (AdaMeZO, {"block_size": -4}),
    (Adam, {"implementation": "triton"}), (LOZO, {"rank": 0}), (LOZO, {"interval": 2.5}),
    (LOZOMomentum, {"momentum": 1.0}), (SubZero, {"interval": 0}), (SparseMeZO, {"sparsity": 1.0}),
    (LeZO, {"sparsity": -0.1}), (FZOO, {"probes": 1}), (MeZOSVRG, {"q": 0}), (MeZOSVRG, {"snapshot_lr": -1.0}),
])
def test_bad_hyperparameters_name_the_value(cls: type[torch.optim.Optimizer], bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="invalid"):
        cls([torch.nn.Parameter(torch.zeros(2))], **bad)


@pytest.mark.parametrize("implementation", ["foreach", "for-loop"])
def test_adam_refuses_float16_where_torch_computes_in_float16(implementation: str) -> None:
    with pytest.raises(ValueError, match="eps rounds to 0"):
        Adam([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))], implementation=implementation)


def test_create_turns_a_bad_value_into_a_usage_error() -> None:
    with pytest.raises(UsageError, match="window"):
        optim.create("adamezo", [torch.nn.Parameter(torch.zeros(2))], window=-1)
