"""The zoo as the harness measures it: SPEC §4's names, the persistent state its table lists, forwards per step,
runs that resume bit-for-bit, and AdaMeZO's bounded extra memory."""

from __future__ import annotations

import io
import math

import pytest
import torch

from zomem import models, optim, workloads
from zomem.cell import Cell
from zomem.harness import run_cell
from zomem.measure import measure, prepare
from zomem.models.opt import opt
from zomem.optim import AdaMeZO, MeZO, base

#: SPEC §4's table: persistent state in copies of the trainable parameters, and forwards per step
TABLE = {
    "inference": (0, 1), "mezo": (0, 2), "zo-sgd-mmt": (1, 2), "zo-adam": (2, 2), "zo-sgd-sign": (0, 2),
    "zo-sgd-cons": (0, 5), "forward-grad": (0, 1), "zo-adamu": (1, 2), "hizoo": (1, 3), "adamezo": (0, 2),
    "sgd": (0, 1), "adam": (2, 1), "lozo": (0, 2), "lozo-m": (0, 2), "subzero": (0, 2), "sparse-mezo": (0, 2),
    "lezo": (0, 2), "fzoo": (0, 9), "mezo-svrg": (2, 4), "adafactor": (0, 1), "adalomo": (0, 1), "lomo": (0, 1),
    "galore": (0, 1), "adamw-8bit": (2 * (1 + 4 / 256), 1), "adam-mini": (1, 1),
}
STATEFUL_ZO = ["zo-sgd-mmt", "zo-adam", "zo-adamu", "hizoo", "mezo-svrg"]


def adamw_8bit_bytes(shapes: list[tuple[int, ...]]) -> int:
    """bitsandbytes' 8-bit AdamW state: per tensor of 4096 elements or more, two moments of one byte each with a float32
    scale per block of 256; below that, two float32 moments; and its two quantisation maps of 256 float32 values."""
    total = 2 * 256 * 4
    for shape in shapes:
        n = math.prod(shape)
        total += 2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 2 * 4 * n
    return total


def test_every_name_of_the_table_is_registered_and_declares_its_state() -> None:
    assert set(TABLE) <= set(optim.OPTIMIZERS.names())
    for name, (copies, _) in TABLE.items():
        assert optim.get(name).state_copies == copies, name


@pytest.mark.parametrize("name", list(TABLE))
def test_recorded_state_is_the_tables(name: str) -> None:
    record = measure(Cell(model="opt-tiny", optimizer=name, workload="sst2", device="cpu", steps=1, warmup=1))
    copies, forwards = TABLE[name]
    assert record.status == "ok"
    assert record.forwards_per_step == forwards
    named = getattr(optim.get(name), "named_state_elements", None)
    if named is not None:  # picked by name (GaLore's projected matrices, Adam-mini's blocks): their elements, in float32
        meta = models.build_meta("opt-tiny")
        shapes = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]
        assert record.breakdown["optimizer_state"] == 4 * named(shapes, {}, meta.config) > 0
        return
    if name == "adamw-8bit":
        shapes = [tuple(p.shape) for p in models.build_meta("opt-tiny").parameters()]
        assert record.breakdown["optimizer_state"] == adamw_8bit_bytes(shapes)
        assert record.state_dtype == "uint8"
        return
    elements = getattr(optim.get(name), "state_elements", None)
    if elements is not None:  # state sized by low-rank factors (LOZO-M's, SubZero's): their elements, in float32
        shapes = [tuple(p.shape) for p in models.build_meta("opt-tiny").parameters()]
        assert record.breakdown["optimizer_state"] == 4 * elements(shapes, {}) > 0
        assert record.state_dtype == "float32"
        return
    # adam's per-parameter step counters are a few bytes beyond 2P, well inside 2%
    assert record.breakdown["optimizer_state"] == pytest.approx(copies * record.breakdown["trainable"], rel=0.02)
    assert record.state_dtype == ("float32" if copies else None)


@pytest.mark.parametrize("name", STATEFUL_ZO)
def test_state_dtype_option_sets_the_state_bytes_and_the_record(name: str) -> None:
    record = measure(Cell(model="opt-tiny", optimizer=name, workload="sst2", device="cpu", steps=1, warmup=1,
                          hparams={"state_dtype": "bfloat16"}))
    copies, _ = TABLE[name]
    assert record.state_dtype == "bfloat16" and record.hparams["state_dtype"] == "bfloat16"
    assert record.breakdown["optimizer_state"] == pytest.approx(copies * record.breakdown["trainable"] / 2, rel=0.02)


#: hyper-parameters that make a few steps exercise each method fully (ZO-AdaMU past its warm-up, the low-rank
#: methods across a redraw of their factors)
RESUME_HPARAMS: dict[str, dict[str, object]] = {
    "zo-adamu": {"total_steps": 6, "t1": 1}, "zo-adam": {"state_dtype": "bfloat16"}, "adamezo": {"window": 2},
    "hizoo": {"hessian_smooth": 0.1}, "lozo": {"interval": 2}, "lozo-m": {"interval": 2}, "subzero": {"interval": 2},
    "galore": {"update_proj_gap": 2},
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


@pytest.mark.parametrize("name", [n for n in optim.OPTIMIZERS.names()
                                  if issubclass(optim.get(n), optim.ZerothOrder) and n != "forward-grad"])
def test_walks_on_a_gpu_never_allocate_more_than_one_cuda_block(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA rule on CPU tensors: "auto" resolves as it would for a cuda tensor.
    rule = base.resolve_block_size
    monkeypatch.setattr(base, "resolve_block_size", lambda size, device: rule(size, torch.device("cuda")))
    # a tiny model whose embedding (64 × 300,000) outgrows a CUDA block, as a 1.3b OPT's does
    model = models.build(opt("opt-wide", 64, 1, 4, vocab=300_000), "cpu")
    assert max(p.numel() for p in model.parameters()) > base.CUDA_BLOCK
    workload = workloads.get("custom:batch=1,seq=8")
    batch = workloads.make_batch(workload, model.config.vocab_size)
    optimizer = optim.create(name, optim.decay_groups(model.named_parameters()), **RESUME_HPARAMS.get(name, {}))
    sizes: list[int] = []
    allocate = optimizer._buffer

    def recorded(device: torch.device, dtype: torch.dtype, size: int, key: str | None = None) -> torch.Tensor:
        sizes.append(size)
        return allocate(device, dtype, size, key)

    monkeypatch.setattr(optimizer, "_buffer", recorded)
    for _ in range(2):
        with torch.no_grad():
            optimizer.step(lambda: workloads.loss(model, workload, batch))
    assert sizes and max(sizes) <= base.CUDA_BLOCK


def count_draws(optimizer: optim.ZerothOrder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the step seed of every block ``optimizer`` draws from here on."""
    seeds: list[int] = []
    draw = optimizer.draw

    def counted(out: torch.Tensor, step_seed: int, index: int, block: int) -> torch.Tensor:
        seeds.append(step_seed)
        return draw(out, step_seed, index, block)

    monkeypatch.setattr(optimizer, "draw", counted)
    return seeds


def test_adamezo_reaches_a_full_window_without_a_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    param = torch.nn.Parameter(torch.randn(100))
    optimizer = AdaMeZO([param], window=5, block_size=None)
    optimizer.reach_steady_state()
    assert optimizer.step_count == 4 and len(optimizer.state["global"]["window"]) == 4
    assert optimizer.state_bytes() == 0
    seeds = count_draws(optimizer, monkeypatch)
    calls = []
    optimizer.step(lambda: calls.append(1) or (param**2).sum())
    assert len(calls) == 2  # the window was filled without any forward
    # two perturbations and, in the update, this step's z and the 4 past ones: K = 5 regenerations
    assert len(seeds) == 2 + 5 and len(set(seeds)) == 5


def test_zo_adamu_reaches_its_annealed_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    param = torch.nn.Parameter(torch.randn(100))
    optimizer = optim.ZOAdaMU([param], t1=1024, block_size=None)
    optimizer.reach_steady_state()
    assert optimizer.step_count == 1025 and optimizer.schedule(1025)[0] < 1.0
    seeds = count_draws(optimizer, monkeypatch)
    optimizer.step(lambda: (param**2).sum())
    assert len(set(seeds)) == 2  # ż and z̈'s noise, which the warm-up never draws


@pytest.mark.parametrize("name,start", [("mezo", 1), ("adamezo", 10), ("zo-adamu", 1026), ("adam", 1)])
def test_the_record_says_from_which_step_it_was_timed(name: str, start: int) -> None:
    record = measure(Cell(model="opt-tiny", optimizer=name, workload="sst2", device="cpu", steps=1, warmup=1))
    assert record.timed_from_step == start
