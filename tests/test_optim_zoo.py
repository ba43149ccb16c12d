"""The zoo as the harness measures it: SPEC §4's names, the persistent state its table lists, forwards per step,
runs that resume bit-for-bit, and AdaMeZO's bounded extra memory."""

from __future__ import annotations

import io

import pytest
import torch

from zomem import optim
from zomem.cell import Cell
from zomem.harness import run_cell
from zomem.measure import measure, prepare
from zomem.optim import AdaMeZO, MeZO

#: SPEC §4's table: persistent state in copies of the trainable parameters, and forwards per step
TABLE = {
    "inference": (0, 1), "mezo": (0, 2), "zo-sgd-mmt": (1, 2), "zo-adam": (2, 2), "zo-sgd-sign": (0, 2),
    "zo-sgd-cons": (0, 5), "forward-grad": (0, 1), "zo-adamu": (1, 2), "hizoo": (1, 3), "adamezo": (0, 2),
    "sgd": (0, 1), "adam": (2, 1),
}
STATEFUL_ZO = ["zo-sgd-mmt", "zo-adam", "zo-adamu", "hizoo"]


def test_every_name_of_the_table_is_registered_and_declares_its_state() -> None:
    assert set(TABLE) <= set(optim.OPTIMIZERS.names())
    for name, (copies, _) in TABLE.items():
        assert optim.get(name).state_copies == copies, name


@pytest.mark.parametrize("name", list(TABLE))
def test_recorded_state_is_the_tables(name: str) -> None:
    record = measure(Cell(model="opt-tiny", optimizer=name, workload="sst2", device="cpu", steps=1, warmup=1))
    copies, forwards = TABLE[name]
    assert record.status == "ok"
    # adam's per-parameter step counters are a few bytes beyond 2P, well inside 2%
    assert record.breakdown["optimizer_state"] == pytest.approx(copies * record.breakdown["trainable"], rel=0.02)
    assert record.forwards_per_step == forwards
    assert record.state_dtype == ("float32" if copies else None)


@pytest.mark.parametrize("name", STATEFUL_ZO)
def test_state_dtype_option_sets_the_state_bytes_and_the_record(name: str) -> None:
    record = measure(Cell(model="opt-tiny", optimizer=name, workload="sst2", device="cpu", steps=1, warmup=1,
                          hparams={"state_dtype": "bfloat16"}))
    copies, _ = TABLE[name]
    assert record.state_dtype == "bfloat16" and record.hparams["state_dtype"] == "bfloat16"
    assert record.breakdown["optimizer_state"] == pytest.approx(copies * record.breakdown["trainable"] / 2, rel=0.02)


#: hyper-parameters that make a few steps exercise each method fully (ZO-AdaMU past its warm-up)
RESUME_HPARAMS: dict[str, dict[str, object]] = {
    "zo-adamu": {"total_steps": 6, "t1": 1}, "zo-adam": {"state_dtype": "bfloat16"}, "adamezo": {"window": 2},
    "hizoo": {"hessian_smooth": 0.1},
}


@pytest.mark.parametrize("name", list(TABLE))
def test_save_and_load_mid_run_gives_the_same_next_steps(name: str) -> None:
    cell = Cell(model="opt-tiny", optimizer=name, workload="sst2", device="cpu", hparams=RESUME_HPARAMS.get(name, {}))
    first, second = prepare(cell), prepare(cell)
    for _ in range(3):
        first.step()
    saved = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved)
    second.model.load_state_dict(loaded["model"])
    second.optimizer.load_state_dict(loaded["optimizer"])
    for _ in range(2):
        first.step()
        second.step()
        for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
            assert torch.equal(a, b)
    assert optim.state_bytes(first.optimizer) == optim.state_bytes(second.optimizer)


def optimizer_peak(cls: type[optim.ZerothOrder], block: int) -> int:
    """Peak bytes the optimizer allocates during one step (after a first step created any state)."""
    # torch's own allocation tracker: it follows every tensor storage made under it, on CPU too.
    from torch.distributed._tools.mem_tracker import MemTracker

    params = [torch.nn.Parameter(torch.randn(n)) for n in (50_000, 120_000)]
    params.append(torch.nn.Parameter(torch.randn(400, 300)))
    optimizer = cls(params, block_size=block)
    optimizer.step(lambda: sum(p.sum() for p in params))
    tracker = MemTracker()
    tracker.track_external(*params)
    with tracker:
        optimizer.step(lambda: sum(p.sum() for p in params))
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("block", [10_000, 4_096])
def test_adamezo_extra_peak_over_mezo_is_two_blocks(block: int) -> None:
    extra = optimizer_peak(AdaMeZO, block) - optimizer_peak(MeZO, block)
    assert 0 < extra <= 2 * block * 4


def test_opt125m_child_process_keeps_the_tables_state() -> None:
    # One real cell of the zoo on opt-125m (the others run on opt-tiny above): ZO-Adam keeps the most, 2P.
    record = run_cell(Cell(model="opt-125m", optimizer="zo-adam", workload="sst2", device="cpu", steps=1, warmup=0))
    assert record.status == "ok", record.error
    assert record.trainable_params == record.params > 100e6
    assert record.breakdown["optimizer_state"] == pytest.approx(2 * record.breakdown["trainable"], rel=0.02)
    assert record.state_dtype == "float32" and record.forwards_per_step == 2
