"""MeZO against an explicit float64 reference, and what a zero-learning-rate round trip costs in each dtype."""

import pytest
import torch

from reference import reference_z
from zomem import models, workloads
from zomem.optim import MeZO, decay_groups, mix
from zomem.optim.base import CPU_BLOCK, resolve_block_size

LR, EPS, DECAY, SEED, BLOCK = 0.05, 1e-3, 0.1, 7, 4


def loss_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    return sum((torch.sin(3 * t) + t**2).sum() for t in tensors)


@pytest.mark.parametrize("block", [BLOCK, None])
def test_matches_float64_reference(block: int | None) -> None:
    torch.manual_seed(0)
    named = [("w", torch.randn(5, 4)), ("b", torch.randn(7)), ("v", torch.randn(3, 3))]
    params = [torch.nn.Parameter(t.double()) for _, t in named]
    optimizer = MeZO(decay_groups(zip([n for n, _ in named], params, strict=True)),
                     lr=LR, eps=EPS, weight_decay=DECAY, seed=SEED, block_size=block)
    # decay_groups orders matrices first, then vectors: that order defines the tensor index j
    order = [params[0], params[2], params[1]]
    expected = [p.detach().clone() for p in order]
    decays = [DECAY, DECAY, 0.0]
    for step in range(3):
        s = mix(SEED, step)
        zs = [reference_z(s, j, t.shape, block) for j, t in enumerate(expected)]
        plus = loss_of([t + EPS * z for t, z in zip(expected, zs, strict=True)])
        minus = loss_of([t - EPS * z for t, z in zip(expected, zs, strict=True)])
        g = (plus - minus) / (2 * EPS)
        expected = [t - LR * (g * z + lam * t) for t, z, lam in zip(expected, zs, decays, strict=True)]
        returned = optimizer.step(lambda: loss_of(list(order)))
        assert float(returned) == pytest.approx(float(plus), rel=1e-12)
        # θ+εz−2εz is θ−εz only up to rounding, which g = ΔL/2ε amplifies ~1/ε-fold: float64 still gives ~1e-12.
        for got, want in zip(order, expected, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-10)
    assert optimizer.step_count == 3


def test_keeps_no_state_and_frees_its_buffer() -> None:
    param = torch.nn.Parameter(torch.randn(3000))
    optimizer = MeZO([param], block_size=1000)
    optimizer.step(lambda: param.sum())
    assert optimizer.state_bytes() == 0 and not optimizer._buffers


def test_block_buffer_is_bounded() -> None:
    param = torch.nn.Parameter(torch.randn(3000))
    optimizer = MeZO([param], block_size=1000)
    walk = optimizer.blocks(mix(0, 0))
    sizes = {b.z.numel() for b in walk}
    assert sizes == {1000} and optimizer._buffers[(param.device, param.dtype)].numel() == 1000


def test_auto_block_size_is_cache_sized_on_cpu_and_whole_tensor_on_cuda() -> None:
    assert resolve_block_size("auto", torch.device("cpu")) == CPU_BLOCK
    assert resolve_block_size("auto", torch.device("cuda")) is None


def test_any_block_regenerates_alone() -> None:
    param = torch.nn.Parameter(torch.zeros(10))
    optimizer = MeZO([param], block_size=4)
    seed = mix(0, 0)
    optimizer.perturb(seed, 1.0)
    alone = optimizer.draw(torch.empty(2), seed, index=0, block=2)
    assert torch.equal(param.detach()[8:], alone)


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(eps=0.0), dict(weight_decay=-0.1), dict(block_size=0)])
def test_bad_hyperparameters_name_the_value(bad: dict) -> None:
    with pytest.raises(ValueError, match="invalid"):
        MeZO([torch.nn.Parameter(torch.zeros(2))], **bad)


def roundtrip_drift(dtype: torch.dtype, steps: int) -> float:
    """Largest relative change (in norm, per tensor) of opt-tiny's weights after MeZO steps with lr 0."""
    model = models.build("opt-tiny", "cpu", dtype)
    workload = workloads.get("sst2")
    batch = workloads.make_batch(workload, model.config.vocab_size)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = MeZO(model.parameters(), lr=0.0, eps=1e-3)
    for _ in range(steps):
        optimizer.step(lambda: workloads.loss(model, workload, batch))
    return max(((p.detach().double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()
               for p, b in zip(model.parameters(), before, strict=True) if b.any())


def test_zero_learning_rate_leaves_float32_weights_unchanged() -> None:
    assert roundtrip_drift(torch.float32, steps=1) < 1e-6


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_round_trip_drift_is_bounded(dtype: torch.dtype, bound: float) -> None:
    # Measured drift is stated in the README; this keeps it from growing unnoticed.
    drifts = {steps: roundtrip_drift(dtype, steps) for steps in (1, 10)}
    print(f"\n{dtype}: relative drift after 1 step {drifts[1]:.2e}, after 10 steps {drifts[10]:.2e}")
    assert drifts[10] < bound
