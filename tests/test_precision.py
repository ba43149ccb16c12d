"""Mixed precision as the harness runs it: float32 weights, forwards under autocast, a gradient scaler for float16
first-order methods, and a record that says so and counts autocast's cache."""

from __future__ import annotations

import pytest
import torch

from zomem import models, optim, records, sweep
from zomem.cell import Cell
from zomem.errors import UsageError
from zomem.measure import measure, prepare


def matmul_params(model: str) -> int:
    """Parameters a matmul reads (nn.Linear weights and biases, the tied head once): what autocast casts."""
    meta = models.build_meta(model)
    return sum({id(p): p.numel() for m in meta.modules() if isinstance(m, torch.nn.Linear)
                for p in m.parameters()}.values())


def mixed(optimizer: str, dtype: str = "bfloat16", **fields: object) -> Cell:
    return Cell("opt-tiny", optimizer, "sst2", dtype=dtype, precision="mixed", device="cpu", steps=1, warmup=1,
                **fields)


def test_mixed_adam_keeps_float32_weights_state_and_gradients_and_counts_the_cache() -> None:
    record = measure(mixed("adam").validated())
    b, params = record.breakdown, record.params
    assert record.status == "ok" and (record.precision, record.dtype) == ("mixed", "bfloat16")
    assert b["weights"] == 4 * params and b["gradients"] == 4 * params
    assert b["optimizer_state"] == pytest.approx(2 * b["weights"], rel=0.01) and record.state_dtype == "float32"
    # a bfloat16 copy of every weight a matmul reads, as the estimator counts them
    assert b["autocast_cache"] == 2 * matmul_params("opt-tiny")
    assert record.key[4] == "mixed-bfloat16"


def test_mixed_mezo_perturbs_float32_weights_and_keeps_no_state() -> None:
    record = measure(mixed("mezo").validated())
    b = record.breakdown
    assert b["weights"] == 4 * record.params and b["optimizer_state"] == 0 and b["gradients"] == 0
    assert b["autocast_cache"] == 2 * matmul_params("opt-tiny")


def test_pure_cells_have_no_autocast_cache() -> None:
    record = measure(Cell("opt-tiny", "mezo", "sst2", dtype="bfloat16", device="cpu", steps=1).validated())
    assert record.precision == "pure" and record.breakdown["autocast_cache"] == 0
    assert record.breakdown["weights"] == 2 * record.params


@pytest.mark.parametrize("name", optim.OPTIMIZERS.names())
def test_every_optimizer_runs_in_mixed_precision(name: str) -> None:
    prepared = prepare(mixed(name).validated())
    before = [p.detach().clone() for p in prepared.model.parameters()]
    loss = prepared.step()
    assert torch.isfinite(loss)
    params = list(prepared.model.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    if name != "inference":
        assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_float16_first_order_steps_through_a_gradient_scaler() -> None:
    prepared = prepare(mixed("adam", dtype="float16").validated())
    assert prepared.precision.scaler is not None
    before = [p.detach().clone() for p in prepared.model.parameters()]
    for _ in range(3):  # the scaler may skip a step whose scaled gradients overflowed, then lowers its scale
        prepared.step()
    assert prepared.precision.scaler.get_scale() <= 2.0**16
    assert any(not torch.equal(p, b) for p, b in zip(prepared.model.parameters(), before, strict=True))
    # zeroth-order methods never backpropagate: no scaler
    assert prepare(mixed("mezo", dtype="float16").validated()).precision.scaler is None
    assert prepare(mixed("adam").validated()).precision.scaler is None  # bfloat16 needs none


@pytest.mark.parametrize("cell,message", [
    (Cell("opt-tiny", "mezo", "sst2", dtype="float32", precision="mixed"), "not a half dtype"),
    (Cell("opt-tiny", "mezo", "sst2", dtype="bfloat16", precision="amp"), "unknown precision"),
    (Cell("opt-tiny", "adam", "sst2", dtype="float16", hparams={"implementation": "foreach"}), "eps rounds to 0"),
])
def test_bad_precisions_are_refused_before_anything_is_built(cell: Cell, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        cell.validated()


def test_float32_weights_let_foreach_adam_run_in_mixed_float16() -> None:
    assert mixed("adam", dtype="float16", hparams={"implementation": "foreach"}).validated().precision == "mixed"


def test_a_resumed_sweep_does_not_reuse_a_pure_record_for_a_mixed_cell() -> None:
    cell = mixed("mezo").validated()
    pure = records.Record("opt-tiny", "mezo", "sst2", "full", "bfloat16", "cpu", 16, 64, steps=1, warmup=1)
    assert not sweep.matches(pure, cell)
    assert sweep.matches(records.Record.from_dict({**pure.__dict__, "precision": "mixed"}), cell)
