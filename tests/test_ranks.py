"""Cells run as several ranks: FSDP shards and replicas on gloo (CPU), the step they take, and how they fail."""

import dataclasses
import os
from multiprocessing import forkserver
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zomem import calibrate, estimate, models, optim, ranks, records, shards, workloads
from zomem.cell import Cell
from zomem.closure import Phases, make_closure
from zomem.errors import UsageError
from zomem.harness import run_cell

#: small enough that a walk cuts every matrix of opt-tiny into blocks, and blocks across the two shards
BLOCK = 1000
SEED = 7


def zo_step(name: str, model: torch.nn.Module, workload: workloads.Workload, batch: workloads.Batch,
            world: int = 1) -> None:
    optimizer = optim.create(name, optim.decay_groups(model.named_parameters()), lr=1e-2, eps=1e-3, seed=SEED,
                             block_size=BLOCK)
    closure, _ = make_closure(model, optimizer, workload, batch, Phases())
    optimizer.step(ranks.averaged(closure, world, model) if world > 1 else closure)


def fsdp_rank(index: int, world: int, folder: str, name: str) -> None:
    """One rank of a 2-rank FSDP step on opt-tiny in float64; rank 0 saves the whole parameters after it."""
    rank = ranks.Rank(index, world, index)
    os.environ[ranks.RENDEZVOUS] = f"file://{folder}/rendezvous"
    ranks.join(torch.device("cpu"), rank)
    model = ranks.sharded(models.spec("opt-tiny"), torch.device("cpu"), torch.float64, rank)
    workload = workloads.get("sst2")
    mine, batch = ranks.split(workload, workloads.make_batch(workload, model.config.vocab_size), rank)
    zo_step(name, model, mine, batch, world)
    whole = {name: p.full_tensor() for name, p in model.named_parameters()}
    if index == 0:
        torch.save(whole, Path(folder, "params.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["mezo", "zo-adam", "hizoo"])  # no state, two moments, a Hessian and 3 forwards
def test_two_fsdp_ranks_take_the_step_one_rank_takes_on_the_same_global_batch(tmp_path: Path, name: str) -> None:
    mp.spawn(fsdp_rank, args=(2, str(tmp_path), name), nprocs=2)
    sharded = torch.load(tmp_path / "params.pt")

    model = models.build(models.spec("opt-tiny"), "cpu", torch.float64)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    workload = workloads.get("sst2")
    zo_step(name, model, workload, workloads.make_batch(workload, model.config.vocab_size))
    assert sharded.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]) or p.ndim == 1, name  # the step moved every matrix
        torch.testing.assert_close(sharded[name], p.detach(), rtol=1e-12, atol=1e-12, msg=name)


def test_a_shard_walks_the_blocks_of_the_whole_tensor_it_covers() -> None:
    # rows split as torch.chunk splits them: 5 rows over 2 ranks are 3 + 2
    class Mesh:
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def size(self) -> int:
            return 2

        def get_local_rank(self) -> int:
            return self.rank

    for rank, first_row in ((0, 0), (1, 3)):
        fake = dataclasses.make_dataclass("Fake", ["shape", "placements", "device_mesh"])
        tensor = fake(torch.Size([5, 4]), (torch.distributed.tensor.Shard(0),), Mesh(rank))
        tensor.numel = lambda: 20
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(shards, "DTensor", fake)
            assert shards.offset(tensor) == first_row * 4


@pytest.mark.parametrize("cell, message", [
    (Cell("opt-tiny", "adam", "sst2", device="cpu", ranks=2, strategy="replicate"), "zeroth-order methods only"),
    (Cell("opt-tiny", "lozo", "sst2", device="cpu", ranks=2), "cannot run on FSDP shards"),
    (Cell("opt-tiny", "mezo", "sst2", device="cpu", ranks=2, strategy="pipeline"), "CUDA only"),
    (Cell("opt-tiny", "mezo", "sst2", device="cpu", ranks=2, tuning="lora"), "full fine-tuning"),
    (Cell("opt-tiny", "mezo", "sst2", device="cpu", ranks=0), "ranks >= 1"),
])
def test_a_strategy_a_cell_cannot_run_is_refused_before_any_rank_starts(cell: Cell, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        run_cell(cell)


def no_rank_left() -> bool:
    server = psutil.Process(forkserver._forkserver._forkserver_pid)
    return not [p for p in server.children() if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("optimizer, status, said", [
    ("zomem_faults:RankOutOfMemory", "oom", "rank 1 of 2: OutOfMemoryError"),
    ("zomem_faults:RankKilled", "oom", "rank 1 of 2: child killed by SIGKILL"),
])
def test_a_rank_that_fails_ends_the_cell_with_one_record_and_no_rank_left(
        tmp_path: Path, faults: None, optimizer: str, status: str, said: str) -> None:
    out = tmp_path / "records.jsonl"
    record = run_cell(Cell("opt-tiny", optimizer, "sst2", device="cpu", ranks=2, strategy="replicate"), out=out)
    assert record.status == status and record.error.startswith(said), record.error
    assert "--- rank 0 ---" in record.error  # the peer's stderr tail comes along
    assert len(out.read_text().splitlines()) == 1
    assert no_rank_left()


def test_a_timeout_kills_every_rank(faults: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOMEM_FAULT_MARK", str(tmp_path / "mark"))
    record = run_cell(Cell("opt-tiny", "zomem_faults:Sleeps", "sst2", device="cpu", ranks=2), timeout=5)
    assert record.status == "error" and "timed out" in record.error and "--- rank 1 ---" in record.error
    assert no_rank_left()


RANKS_RECORDS = Path(__file__).parent.parent / "reports" / "cpu-ranks" / "records.jsonl"


def test_the_estimator_predicts_every_measured_multi_rank_cell_within_five_percent() -> None:
    measured = [r for r in records.read(RANKS_RECORDS) if r.status == "ok"]
    assert {(r.strategy, r.ranks) for r in measured} >= {("fsdp", 2), ("replicate", 2)}
    residuals = calibrate.residuals(measured, estimate.Calibration.load("cpu"))
    assert len(residuals) == len(measured)
    worst = max(residuals, key=lambda res: abs(res.relative))
    assert abs(worst.relative) <= 0.05, (worst.record.key, worst.relative)


def test_each_fsdp_rank_holds_half_the_weights_and_state_of_one_device() -> None:
    measured = [r for r in records.read(RANKS_RECORDS) if r.status == "ok"]
    single = {(r.model, r.optimizer, r.workload): r for r in measured if r.strategy is None}
    pairs = [(r, single[r.model, r.optimizer, r.workload]) for r in measured
             if r.strategy == "fsdp" and (r.model, r.optimizer, r.workload) in single]
    assert {r.optimizer for r, _ in pairs} >= {"mezo", "adam"}
    for sharded, whole in pairs:
        # FSDP2 shards every unit, the root too: a rank is short of half only by the padding of an uneven split
        for part in ("weights", "optimizer_state", "gradients"):
            assert sharded.breakdown[part] == pytest.approx(whole.breakdown[part] / 2, rel=0.01), part
        # and the ranks peak alike: each runs half the batch over the same shards
        peaks = [p["cpu_hwm"] for p in sharded.rank_peak_bytes]
        assert len(peaks) == 2 and max(peaks) == sharded.peak_bytes["cpu_hwm"] <= min(peaks) * 1.01
        assert sharded.peak_bytes["cpu_hwm"] < whole.peak_bytes["cpu_hwm"]


def test_a_report_of_two_rank_cells_shows_each_ranks_peak(tmp_path: Path) -> None:
    from zomem.cli import main as cli

    out = tmp_path / "report"
    assert cli(["report", "--models", "opt-tiny", "--optimizers", "mezo", "--workloads", "sst2", "--device", "cpu",
                "--ranks", "2", "--hardware", "1xA100-80GB", "--out", str(out)]) == 0
    (record,) = records.read(out / "records.jsonl")
    assert (record.ranks, record.strategy, len(record.rank_peak_bytes)) == (2, "fsdp", 2)
    # each rank's logits are those of its half of the batch
    half = dataclasses.replace(workloads.get("sst2"), batch_size=workloads.get("sst2").batch_size // 2)
    assert record.breakdown["logits"] == workloads.logits_bytes(half, models.spec("opt-tiny").vocab, torch.float32)
    index = (out / "index.md").read_text()
    assert "Each cell ran as 2 ranks sharing the model by `fsdp`" in index
    peaks = " / ".join(f"{p['cpu_hwm'] / 2**20:,.0f}" for p in record.rank_peak_bytes)
    assert f"| mezo [fsdp x2] | sst2       | `cpu_hwm` | {peaks}" in (out / "rank_peaks.md").read_text()
