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
from collections.abc import Callable
from typing import Any

import pytest
import torch

from reference import FLOAT64, Numerics
from zomem import optim
from zomem.optim import (AdaMeZO, Adam, ForwardGrad, HiZOO, MeZO, ZOAdaMU, ZOAdam, ZOSGDConservative,
                         ZOSGDMomentum, ZOSGDSign, mix)

EPS, SEED = 1e-3, 7
SHAPES = [(5, 4), (7,), (3, 3)]
BLOCKS = pytest.mark.parametrize("block", [4, None], ids=["blocks-of-4", "whole-tensors"])
HALF = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
PLUGIN = "clipped-zo"  # the test plug-in, registered through its entry point
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
    cls = optim.get(name)
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
        work = [hi * (1 - hessian_smooth + hessian_smooth * curvature * zi**2) for hi, zi in zip(hessian, z, strict=True)]
        hessian[:] = n.keep(work)
        g = (plus - minus) / (2 * EPS)
        step = [zi / wi.sqrt() for zi, wi in zip(z, work, strict=True)]
        return moved(moved(at, probe, EPS, n), step, -lr * g, n), loss0

    return update, {"hessian": hessian}


def adamezo_reference(n: Numerics, block: int | None, lr: float, window: int, betas: tuple[float, float],
                      adam_eps: float, past: list[tuple[float, Tensors]] | None = None) -> tuple[Update, dict[str, Tensors]]:
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
}
#: hyper-parameters a reference takes that the optimizer does not (ZO-AdaMU's schedule needs its total)
EXTRA = {"zo-adamu": {"total_steps": 5}}


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
    assert set(optim.OPTIMIZERS.names()) - {"inference"} == set(REFERENCES)


@pytest.mark.parametrize("name", list(REFERENCES))
@BLOCKS
def test_float64_steps_match_the_reference(name: str, block: int | None, plugin_path: object) -> None:
    params, optimizer, returned, want, losses, state = run_against_reference(name, 3, block, FLOAT64)
    assert_same(params, want)
    assert returned == pytest.approx(losses, rel=1e-10)
    for key, values in state.items():
        # HiZOO's curvature divides by 2ε², amplifying rounding ~1e6-fold: still ~1e-9 in float64
        for got, w in zip([optimizer.state[p][key] for p in params], values, strict=True):
            torch.testing.assert_close(got, w, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", list(REFERENCES))
@BLOCKS
@HALF
def test_one_half_precision_step_matches_the_reference(name: str, block: int | None, dtype: torch.dtype,
                                                       plugin_path: object) -> None:
    n = Numerics(dtype)
    params, optimizer, returned, want, losses, state = run_against_reference(name, 1, block, n)
    assert all(p.dtype == dtype for p in params)
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
}
#: the loss is a sum over the weights divided by √n, so the projected gradient g = ∇L·z is O(1), as in fine-tuning
SCALE = 1 / 256


@pytest.mark.parametrize("name", list(LONG_RUN))
@HALF
def test_twenty_half_precision_steps_stay_finite_and_move(name: str, dtype: torch.dtype, plugin_path: object) -> None:
    generator = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter((0.1 * torch.randn(256, 256, generator=generator)).to(dtype))]
    start = params[0].detach().clone()
    optimizer = optim.create(name, params, **LONG_RUN[name])
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
        if value.numel() > 1:
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
    (Adam, {"implementation": "triton"}),
])
def test_bad_hyperparameters_name_the_value(cls: type[torch.optim.Optimizer], bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="invalid"):
        cls([torch.nn.Parameter(torch.zeros(2))], **bad)


@pytest.mark.parametrize("implementation", ["foreach", "for-loop"])
def test_adam_refuses_float16_where_torch_computes_in_float16(implementation: str) -> None:
    with pytest.raises(ValueError, match="eps rounds to 0"):
        Adam([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))], implementation=implementation)


def test_create_turns_a_bad_value_into_a_usage_error() -> None:
    from zomem.errors import UsageError

    with pytest.raises(UsageError, match="window"):
        optim.create("adamezo", [torch.nn.Parameter(torch.zeros(2))], window=-1)
