"""MeZO's buffers and seeding, and what a zero-learning-rate round trip costs in each dtype (its update is checked
against a float64 reference in tests/test_optim.py)."""

import pytest
import torch

from zomem import models, workloads
from zomem.optim import MeZO, mix
from zomem.optim.base import CPU_BLOCK, CUDA_BLOCK, resolve_block_size

LR, EPS, DECAY, SEED, BLOCK = 0.05, 1e-3, 0.1, 7, 4


def loss_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    return sum((torch.sin(3 * t) + t**2).sum() for t in tensors)


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
    assert sizes == {1000} and optimizer._buffers[(param.device, torch.float32)].numel() == 1000


def test_auto_block_size_is_cache_sized_on_cpu_and_bounded_on_cuda() -> None:
    assert resolve_block_size("auto", torch.device("cpu")) == CPU_BLOCK
    assert resolve_block_size("auto", torch.device("cuda")) == CUDA_BLOCK


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
