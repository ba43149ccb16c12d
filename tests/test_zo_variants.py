"""The zeroth-order methods that followed MeZO (LOZO, SubZero, Sparse MeZO, LeZO, FZOO, MeZO-SVRG): the properties
their float64 references (tests/test_optim.py) do not show: what they keep, what they draw, what they restore."""

from __future__ import annotations

import math

import pytest
import torch

from reference import reference_z
from zomem import models, optim
from zomem.optim import FZOO, LOZO, LeZO, LOZOMomentum, MeZO, MeZOSVRG, SparseMeZO, SubZero, mix


def loss_of(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return sum((torch.sin(3 * p) + p**2).sum() for p in params)


def matrix_and_vector() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(40, 12, generator=generator)),
            torch.nn.Parameter(torch.randn(9, generator=generator))]


def drawn_elements(optimizer: optim.ZerothOrder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many random numbers each draw of ``optimizer`` makes from here on."""
    counts: list[int] = []
    draw = optimizer.draw

    def counted(out: torch.Tensor, step_seed: int, index: int, block: int) -> torch.Tensor:
        counts.append(out.numel())
        return draw(out, step_seed, index, block)

    monkeypatch.setattr(optimizer, "draw", counted)
    return counts


def test_lozo_keeps_nothing_and_draws_factors_not_perturbations(monkeypatch: pytest.MonkeyPatch) -> None:
    params = matrix_and_vector()
    optimizer = LOZO(params, lr=0.01, rank=2, interval=3, block_size=None)
    counts = drawn_elements(optimizer, monkeypatch)
    optimizer.step(lambda: loss_of(params))
    assert optimizer.state_bytes() == 0
    # three walks, each drawing V (12 × 2) and U (40 × 2) for the matrix and z (9) for the vector
    assert sorted(counts) == sorted([12 * 2, 40 * 2, 9] * 3)


def test_lozo_redraws_v_every_interval_from_the_seed_of_its_refresh() -> None:
    params = matrix_and_vector()
    optimizer = LOZO(params, rank=2, interval=3, block_size=None)
    seen = []
    for _ in range(7):
        t, _ = optimizer.begin()
        seen.append(optimizer._right_seed)
        assert seen[-1] == optimizer.step_seed(t - t % 3)
    assert seen[0] == seen[2] != seen[3] == seen[5] != seen[6]


def test_lozo_m_state_is_its_low_rank_momentum() -> None:
    params = matrix_and_vector()
    optimizer = LOZOMomentum(params, lr=0.01, rank=2, interval=2, block_size=None)
    for _ in range(3):
        optimizer.step(lambda: loss_of(params))
    assert optimizer.state[params[0]]["momentum"].shape == (40, 2)
    assert optimizer.state[params[1]]["momentum"].shape == (9,)
    shapes = [tuple(p.shape) for p in params]
    assert optimizer.state_bytes() == LOZOMomentum.state_elements(shapes, {"rank": 2}) * 4 == (40 * 2 + 9) * 4


def test_subzero_keeps_orthonormal_subspaces_redrawn_every_interval() -> None:
    params = matrix_and_vector()
    optimizer = SubZero(params, lr=0.01, rank=3, interval=2, block_size=5 * 12)
    kept = []
    for _ in range(3):
        optimizer.step(lambda: loss_of(params))
        kept.append({k: v.clone() for k, v in optimizer.state[params[0]].items()})
    u, v = kept[-1]["left"], kept[-1]["right"]
    torch.testing.assert_close(u.T @ u, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.equal(kept[0]["left"], kept[1]["left"]) and not torch.equal(kept[1]["left"], kept[2]["left"])
    assert params[1] not in optimizer.state  # vectors are perturbed as MeZO does, with no state
    assert optimizer.state_bytes() == SubZero.state_elements([(40, 12), (9,)], {"rank": 3}) * 4 == (40 + 12) * 3 * 4


def test_subzero_perturbation_has_unit_variance_like_z() -> None:
    # s = √(mn)/r: E[(s·UZVᵀ)²] = mn/r² · r²/(mn) = 1 per element, the scale MeZO's ε and η are set for
    param = torch.nn.Parameter(torch.zeros(64, 48))
    optimizer = SubZero([param], rank=8, block_size=None)
    optimizer.redraw(mix(0, 0))
    squares = [next(optimizer.blocks(mix(1, t))).z.pow(2).mean() for t in range(200)]
    assert float(torch.stack(squares).mean()) == pytest.approx(1.0, rel=0.1)


def test_sparse_mezo_restores_theta_exactly_where_a_plain_reading_of_the_mask_would_not() -> None:
    # weights packed around the threshold, so that many unperturbed ones sit within ε·|z| of it
    generator = torch.Generator().manual_seed(5)
    start = 0.002 * torch.randn(3000, generator=generator, dtype=torch.float64)
    param = torch.nn.Parameter(start.clone())
    optimizer = SparseMeZO([param], lr=0.0, eps=1e-3, sparsity=0.5, seed=9, block_size=1000)
    optimizer.step(lambda: (param**2).sum())
    h = start.abs().kthvalue(1500).values
    mask = start.abs() <= h
    assert torch.equal(param.detach()[~mask], start[~mask]), "weights outside the mask are never touched"
    torch.testing.assert_close(param.detach()[mask], start[mask], rtol=0, atol=1e-18)
    # the reading a walk makes without the noted corrections: wrong for some weights outside the mask
    z = reference_z(mix(9, 0), 0, (3000,), 1000)
    perturbed = start + 1e-3 * z * mask
    assert ((perturbed - 1e-3 * z).abs() <= h).ne(mask).sum() > 10


def test_sparse_mezo_without_its_corrections_would_not_restore_theta(monkeypatch: pytest.MonkeyPatch) -> None:
    class Forgetful(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: object, value: object) -> None:
            pass

    start = 0.002 * torch.randn(3000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    param = torch.nn.Parameter(start.clone())
    optimizer = SparseMeZO([param], lr=0.0, sparsity=0.5, seed=9, block_size=1000)
    monkeypatch.setattr(optimizer, "_misread", Forgetful())
    optimizer.step(lambda: (param**2).sum())
    assert (param.detach() - start).abs().max() > 1e-5


def test_sparse_mezo_threshold_reads_a_bounded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    from zomem.optim import sparse_mezo

    monkeypatch.setattr(sparse_mezo, "SAMPLE", 1000)
    param = torch.nn.Parameter(torch.randn(200_000, generator=torch.Generator().manual_seed(1)))
    optimizer = SparseMeZO([param], sparsity=0.75)
    (h,) = optimizer.thresholds()
    # the 25% quantile of |N(0, 1)| is 0.319; a 1000-element sample is within a few hundredths of it
    assert h == pytest.approx(0.319, abs=0.04)
    assert optimizer.thresholds() == [h], "the sample's positions are fixed by the optimizer's seed"


def test_lezo_perturbs_fewer_elements_than_mezo(monkeypatch: pytest.MonkeyPatch) -> None:
    model = models.build("opt-tiny", "cpu")
    named = list(model.named_parameters())
    outside = sum(p.numel() for name, p in named if ".layers." not in name)
    per_layer = sum(p.numel() for name, p in named if ".layers.0." in name)
    layers = model.config.num_hidden_layers
    drawn = {}
    for cls in (MeZO, LeZO):
        optimizer = cls(optim.decay_groups(model.named_parameters()), lr=0.0, block_size=None)
        counts = drawn_elements(optimizer, monkeypatch)
        with torch.no_grad():
            optimizer.step(lambda: model(torch.ones(1, 4, dtype=torch.long)).logits.float().mean())
        drawn[cls] = sum(counts) / 3  # elements perturbed per walk (three walks a step)
    # LeZO walks the embeddings and final norm every step, and max(1, round(0.25·L)) of the L decoder layers
    keep = max(1, round(0.25 * layers))
    assert drawn[MeZO] == outside + layers * per_layer
    assert drawn[LeZO] == outside + keep * per_layer < drawn[MeZO]


def test_lezo_draws_a_different_subset_of_layers_each_step() -> None:
    model = models.build("opt-tiny", "cpu")
    optimizer = LeZO(optim.decay_groups(model.named_parameters()), sparsity=0.5)
    layers, outside = optimizer.layers()
    assert len(layers) == model.config.num_hidden_layers and outside
    subsets = {frozenset(optimizer.chosen(mix(0, t))) for t in range(20)}
    assert len(subsets) > 1 and all(set(outside) <= s for s in subsets)


def test_fzoo_runs_n_plus_one_forwards_and_skips_a_step_without_spread() -> None:
    params = matrix_and_vector()
    start = [p.detach().clone() for p in params]
    calls = []
    optimizer = FZOO(params, probes=5)
    optimizer.step(lambda: calls.append(1) or torch.tensor(1.0))  # every loss equal: σ = 0
    assert len(calls) == 6
    for p, s in zip(params, start, strict=True):
        torch.testing.assert_close(p.detach(), s, rtol=0, atol=1e-6)  # only the probes' round trips
        assert torch.isfinite(p).all()


def test_mezo_svrg_takes_a_snapshot_every_q_steps_and_keeps_two_copies() -> None:
    params = matrix_and_vector()
    optimizer = MeZOSVRG(params, lr=0.01, q=3)
    forwards = []
    for _ in range(4):
        calls: list[int] = []
        optimizer.step(lambda: calls.append(1) or loss_of(params))
        forwards.append(len(calls))
    assert forwards == [2, 4, 4, 2]  # a snapshot's estimate, then two estimates (at θ and θ̄) per step
    assert optimizer.state_bytes() == 2 * sum(p.numel() for p in params) * 4


@pytest.mark.parametrize("cls", [LOZOMomentum, SubZero])
def test_low_rank_state_elements_of_opt_125m_stay_below_a_twentieth_of_the_parameters(cls: type) -> None:
    shapes = [tuple(p.shape) for p in models.build_meta("opt-125m").parameters()]
    params = sum(math.prod(s) for s in shapes)
    assert 0 < cls.state_elements(shapes, {}) < 0.05 * params


@pytest.mark.parametrize("cls,name", [(LOZOMomentum, "lozo-m"), (SubZero, "subzero")])
def test_the_estimator_counts_low_rank_state_from_the_models_shapes(cls: type, name: str) -> None:
    from zomem import estimate

    shapes = [tuple(p.shape) for p in models.build_meta("opt-125m").parameters()]
    per_param = estimate.persistent_per_param(name, "float32", "pure", {"state_dtype": "bfloat16"}, "opt-125m")
    assert per_param.state * estimate.shape("opt-125m").params == pytest.approx(2 * cls.state_elements(shapes, {}))
