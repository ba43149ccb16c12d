"""Each zeroth-order optimizer's update against an explicit float64 reference written from its equations.

The references regenerate z by the documented rule (block k of tensor j at step seed s = mix(seed, t) is drawn
from a generator seeded mix(s, j, k)) and compute losses and updates tensor by tensor, storing whatever the
method claims it need not store (AdaMeZO's past perturbations).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from zomem import optim
from reference import reference_z
from zomem.optim import AdaMeZO, ForwardGrad, HiZOO, ZOAdaMU, ZOAdam, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign, mix

EPS, SEED = 1e-3, 7
SHAPES = [(5, 4), (7,), (3, 3)]
BLOCKS = pytest.mark.parametrize("block", [4, None], ids=["blocks-of-4", "whole-tensors"])
Tensors = list[torch.Tensor]


def zs(step_seed: int, block: int | None) -> Tensors:
    return [reference_z(step_seed, j, shape, block) for j, shape in enumerate(SHAPES)]


def loss_of(tensors: Tensors) -> torch.Tensor:
    return sum((torch.sin(3 * t) + t**2).sum() for t in tensors)


def grad_of(tensors: Tensors) -> Tensors:
    return [3 * torch.cos(3 * t) + 2 * t for t in tensors]


def start() -> Tensors:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in SHAPES]


def along(theta: Tensors, direction: Tensors, scale: float) -> Tensors:
    return [t + scale * d for t, d in zip(theta, direction, strict=True)]


def projected(theta: Tensors, direction: Tensors) -> tuple[float, float]:
    """(L(θ+εd), g = (L(θ+εd) − L(θ−εd))/2ε)."""
    plus, minus = float(loss_of(along(theta, direction, EPS))), float(loss_of(along(theta, direction, -EPS)))
    return plus, (plus - minus) / (2 * EPS)


def run(cls: type[torch.optim.Optimizer], steps: int, block: int | None,
        **hparams: object) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, list[float]]:
    """The optimizer's own steps from the same start: its parameters, itself and the losses it returned."""
    params = [torch.nn.Parameter(t) for t in start()]
    optimizer = cls(params, seed=SEED, block_size=block, **hparams)
    returned = [float(optimizer.step(lambda: loss_of(params))) for _ in range(steps)]
    return params, optimizer, returned


def assert_same(got: list[torch.nn.Parameter] | Tensors, want: Tensors) -> None:
    # g = ΔL/2ε amplifies rounding ~1/ε-fold: float64 still agrees to ~1e-12.
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.detach(), w, rtol=1e-9, atol=1e-10)


def reference_loop(steps: int, update: Callable[[int, Tensors], tuple[Tensors, float]]) -> tuple[Tensors, list[float]]:
    theta, losses = start(), []
    for t in range(steps):
        theta, loss = update(t, theta)
        losses.append(loss)
    return theta, losses


@BLOCKS
def test_zo_sgd_momentum(block: int | None) -> None:
    lr, mu = 0.05, 0.8
    m = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = zs(mix(SEED, t), block)
        plus, g = projected(theta, z)
        m[:] = [mu * mi + g * zi for mi, zi in zip(m, z, strict=True)]
        return [th - lr * mi for th, mi in zip(theta, m, strict=True)], plus

    want, losses = reference_loop(3, update)
    params, optimizer, returned = run(ZOSGDMomentum, 3, block, lr=lr, momentum=mu)
    assert_same(params, want)
    assert returned == pytest.approx(losses, rel=1e-10)
    assert_same([optimizer.state[p]["momentum"] for p in params], m)


@BLOCKS
def test_zo_adam(block: int | None) -> None:
    lr, b1, b2, adam_eps = 0.05, 0.8, 0.9, 1e-8
    m = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    v = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = zs(mix(SEED, t), block)
        plus, g = projected(theta, z)
        m[:] = [b1 * mi + (1 - b1) * g * zi for mi, zi in zip(m, z, strict=True)]
        v[:] = [b2 * vi + (1 - b2) * (g * zi) ** 2 for vi, zi in zip(v, z, strict=True)]
        m_hat = [mi / (1 - b1 ** (t + 1)) for mi in m]
        v_hat = [vi / (1 - b2 ** (t + 1)) for vi in v]
        return [th - lr * mh / (vh.sqrt() + adam_eps) for th, mh, vh in zip(theta, m_hat, v_hat, strict=True)], plus

    want, losses = reference_loop(3, update)
    params, _, returned = run(ZOAdam, 3, block, lr=lr, betas=(b1, b2), adam_eps=adam_eps)
    assert_same(params, want)
    assert returned == pytest.approx(losses, rel=1e-10)


@BLOCKS
def test_zo_sgd_sign(block: int | None) -> None:
    lr = 0.05

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = zs(mix(SEED, t), block)
        plus, g = projected(theta, z)
        return [th - lr * torch.sign(g * zi) for th, zi in zip(theta, z, strict=True)], plus

    want, losses = reference_loop(3, update)
    params, _, returned = run(ZOSGDSign, 3, block, lr=lr)
    assert_same(params, want)
    assert returned == pytest.approx(losses, rel=1e-10)


@BLOCKS
def test_zo_sgd_conservative_keeps_the_best_of_three(block: int | None) -> None:
    lr, kept = 0.02, []

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = zs(mix(SEED, t), block)
        loss0 = float(loss_of(theta))
        _, g = projected(theta, z)
        descent, ascent = along(theta, z, -lr * g), along(theta, z, lr * g)
        # ascent first, then descent, then θ: the first of equal losses wins (the authors' tie order)
        candidates = [(float(loss_of(ascent)), "ascent", ascent), (float(loss_of(descent)), "descent", descent),
                      (loss0, "stay", theta)]
        best = min(candidates, key=lambda c: c[0])
        kept.append(best[1])
        return best[2], loss0

    want, losses = reference_loop(8, update)
    params, _, returned = run(ZOSGDConservative, 8, block, lr=lr)
    assert_same(params, want)
    assert returned == pytest.approx(losses, rel=1e-10)
    assert len(set(kept)) >= 2, f"the reference should exercise more than one choice, kept {kept}"


@BLOCKS
def test_forward_grad(block: int | None) -> None:
    lr = 0.05

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        v = zs(mix(SEED, t), block)
        jvp = float(sum((gi * vi).sum() for gi, vi in zip(grad_of(theta), v, strict=True)))
        return along(theta, v, -lr * jvp), float(loss_of(theta))

    want, losses = reference_loop(3, update)
    params, optimizer, returned = run(ForwardGrad, 3, block, lr=lr)
    assert_same(params, want)
    assert returned == pytest.approx(losses, rel=1e-10)
    assert optimizer.state_bytes() == 0


def reference_anneal(t: int, t1: float, t2: float) -> tuple[float, float, float]:
    """The documented schedule, written out: 1 until T1, a half cosine down to (0.5, 0.9, 0.01) at T2."""
    finals = (0.5, 0.9, 0.01)
    if t < t1:
        return 1.0, 1.0, 1.0
    progress = min((t - t1) / (t2 - t1), 1.0)
    return tuple(f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress)) for f in finals)  # type: ignore[return-value]


@BLOCKS
def test_zo_adamu_through_warm_up_annealing_and_final(block: int | None) -> None:
    lr, sigma, t1, t2 = 0.01, 1e-8, 1, 3
    h = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        alpha, beta1, beta2 = reference_anneal(t, t1, t2)
        s = mix(SEED, t)
        z_dot = [math.sqrt(alpha) * z for z in zs(s, block)]
        z_ddot = [hi + math.sqrt(1 - alpha) * n for hi, n in zip(h, zs(mix(s, 1), block), strict=True)]
        m = [beta1 * a + (1 - beta1) * b for a, b in zip(z_dot, z_ddot, strict=True)]
        v = [beta2 * a**2 + (1 - beta2) * b**2 for a, b in zip(z_dot, z_ddot, strict=True)]
        plus, g = projected(theta, m)
        h[:] = m
        return [th - lr * g * mi / (vi + sigma).sqrt() for th, mi, vi in zip(theta, m, v, strict=True)], plus

    want, losses = reference_loop(5, update)
    params, optimizer, returned = run(ZOAdaMU, 5, block, lr=lr, sigma=sigma, total_steps=5, t1=t1, t2=t2)
    assert_same(params, want)
    assert returned == pytest.approx(losses, rel=1e-10)
    assert_same([optimizer.state[p]["perturbation_momentum"] for p in params], h)


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


@BLOCKS
def test_hizoo_and_its_hessian_update(block: int | None) -> None:
    lr, smooth = 0.05, 0.1
    hessian = [torch.ones(s, dtype=torch.float64) for s in SHAPES]

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = zs(mix(SEED, t), block)
        loss0 = float(loss_of(theta))
        probe = [zi / hi.sqrt() for zi, hi in zip(z, hessian, strict=True)]
        plus, minus = float(loss_of(along(theta, probe, EPS))), float(loss_of(along(theta, probe, -EPS)))
        h_hat = [abs(plus + minus - 2 * loss0) / (2 * EPS**2) * hi * zi**2 for hi, zi in zip(hessian, z, strict=True)]
        hessian[:] = [(1 - smooth) * hi + smooth * hh for hi, hh in zip(hessian, h_hat, strict=True)]
        g = (plus - minus) / (2 * EPS)
        return [th - lr * g * zi / hi.sqrt() for th, zi, hi in zip(theta, z, hessian, strict=True)], loss0

    want, losses = reference_loop(3, update)
    params, optimizer, returned = run(HiZOO, 3, block, lr=lr, hessian_smooth=smooth)
    # the curvature term divides by 2ε², amplifying rounding ~1e6-fold: still ~1e-9 in float64
    for got, w in zip([optimizer.state[p]["hessian"] for p in params], hessian, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-7, atol=1e-9)
    assert not all(torch.allclose(h, torch.ones_like(h)) for h in hessian), "the Hessian should have moved"
    assert_same(params, want)
    assert returned == pytest.approx(losses, rel=1e-10)


@BLOCKS
def test_adamezo_against_stored_perturbations(block: int | None) -> None:
    lr, window, b1, b2, adam_eps = 0.05, 3, 0.7, 0.9, 1e-8
    past: list[tuple[float, Tensors]] = []  # newest first: the K perturbations AdaMeZO does not store

    def update(t: int, theta: Tensors) -> tuple[Tensors, float]:
        z = zs(mix(SEED, t), block)
        plus, g = projected(theta, z)
        past.insert(0, (g, z))
        del past[window:]
        w1 = [(1 - b1) * b1**i for i in range(len(past))]
        w2 = [(1 - b2) * b2**i for i in range(len(past))]
        new = []
        for j, th in enumerate(theta):
            m = sum(w * gi * zi[j] for w, (gi, zi) in zip(w1, past, strict=True)) / sum(w1)
            v = sum(w * (gi * zi[j]) ** 2 for w, (gi, zi) in zip(w2, past, strict=True)) / sum(w2)
            new.append(th - lr * m / (v.sqrt() + adam_eps))
        return new, plus

    want, losses = reference_loop(6, update)
    params, optimizer, returned = run(AdaMeZO, 6, block, lr=lr, window=window, betas=(b1, b2), adam_eps=adam_eps)
    assert_same(params, want)
    assert returned == pytest.approx(losses, rel=1e-10)
    saved = optimizer.state["global"]["window"]
    assert [s for s, _ in saved] == [mix(SEED, t) for t in (3, 4, 5)]
    assert [g for _, g in saved] == pytest.approx([g for g, _ in reversed(past)], rel=1e-9)
    assert optimizer.state_bytes() == 0


@pytest.mark.parametrize("cls,bad", [
    (ZOSGDMomentum, {"momentum": 1.0}), (ZOSGDMomentum, {"state_dtype": "float8"}), (ZOAdam, {"betas": (0.9, 1.5)}),
    (ZOAdam, {"adam_eps": 0.0}), (ZOSGDSign, {"eps": -1.0}), (ZOSGDConservative, {"lr": -0.1}),
    (ForwardGrad, {"lr": -1.0}), (ZOAdaMU, {"t1": 2000, "total_steps": 1000}), (ZOAdaMU, {"sigma": 0.0}),
    (HiZOO, {"hessian_smooth": 2.0}), (AdaMeZO, {"window": 0}), (AdaMeZO, {"block_size": -4}),
])
def test_bad_hyperparameters_name_the_value(cls: type[torch.optim.Optimizer], bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="invalid"):
        cls([torch.nn.Parameter(torch.zeros(2))], **bad)


def test_create_turns_a_bad_value_into_a_usage_error() -> None:
    from zomem.errors import UsageError

    with pytest.raises(UsageError, match="window"):
        optim.create("adamezo", [torch.nn.Parameter(torch.zeros(2))], window=-1)
