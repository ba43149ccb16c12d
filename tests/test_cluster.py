"""Spreading a sweep: cells side by side (pinned to GPUs of their own, or on a shared CPU), deterministic shards merged
into one report, and shard jobs submitted through submitit: its local executor for real, Slurm's configuration only."""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import submitit
import torch
from submitit.slurm.slurm import SlurmExecutor, SlurmJob

from zomem import cluster, harness, records, sweep
from zomem.cell import Cell
from zomem.cli import main as cli
from zomem.cli.report import shard_job
from zomem.errors import UsageError
from zomem.measure import record_for
from zomem.records import Record

REPORT = ["report", "--models", "opt-tiny", "--optimizers", "inference", "mezo", "--workloads", "sst2", "--device",
          "cpu", "--warmup", "0", "--hardware", "1xA100-80GB"]


def made(optimizer: str, peak_mib: float = 100, status: str = "ok", cpu: str = "CPU A", **cell: Any) -> Record:
    """A record built by hand, as a child would have written it for ``optimizer`` on opt-tiny sst2."""
    made_cell = Cell("opt-tiny", optimizer, "sst2", device="cpu", steps=1, warmup=0, **cell)
    if status != "ok":
        return record_for(made_cell, status=status, error="child failed")
    return record_for(made_cell, peak_bytes={"cpu_hwm": int(peak_mib * 2**20)}, params=1000,
                      step_seconds={"median": 0.1, "iqr": 0.0, "n": 1}, forwards_per_step=1.0,
                      env={"cpu": cpu, "gpu": None})


def folder_of(path: Path, *held: Record) -> Path:
    path.mkdir(parents=True)
    records.write(path / "records.jsonl", held)
    return path


@pytest.fixture(scope="module")
def shared_cpu_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real unsharded report of two cells measured side by side on this CPU (--jobs 2 --allow-shared-cpu)."""
    out = tmp_path_factory.mktemp("one-run") / "report"
    assert cli([*REPORT, "--jobs", "2", "--allow-shared-cpu", "--out", str(out)]) == 0
    return out


def test_cells_side_by_side_on_a_cpu_need_allow_shared_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep, "run_cell", lambda *args, **kwargs: pytest.fail("a cell ran"))
    assert cli([*REPORT, "--jobs", "2", "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-shared-cpu" in err
    assert not (tmp_path / "report" / "records.jsonl").exists()
    with pytest.raises(SystemExit):
        cli([*REPORT, "--jobs", "0", "--out", str(tmp_path / "report")])


def test_a_shared_cpu_sweep_measures_every_cell_and_its_index_says_so(shared_cpu_run: Path) -> None:
    measured = records.read(shared_cpu_run / "records.jsonl")
    # appended as each finished, then left in plan order
    assert [(r.optimizer, r.status) for r in measured] == [("inference", "ok"), ("mezo", "ok")]
    assert all(r.env["cells_at_once"] == 2 for r in measured)
    assert "**Shared CPU**: 2 cells ran 2 at a time" in (shared_cpu_run / "index.md").read_text()


def test_jobs_auto_is_one_cell_per_visible_gpu_and_one_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cluster.jobs_at_once("auto", "cuda", ["0", "1", "2"], allow_shared_cpu=False) == 3
    assert cluster.jobs_at_once("auto", "cpu", [], allow_shared_cpu=False) == 1
    assert cluster.jobs_at_once(2, "cpu", [], allow_shared_cpu=True) == 2
    assert cluster.jobs_at_once("auto", "cuda:1", ["0", "1"], allow_shared_cpu=False) == 1
    with pytest.raises(UsageError, match="2 GPUs are visible"):
        cluster.jobs_at_once(3, "cuda", ["0", "1"], allow_shared_cpu=False)
    with pytest.raises(UsageError, match="--device cuda"):
        cluster.jobs_at_once(2, "cuda:1", ["0", "1"], allow_shared_cpu=False)
    # under Slurm the box's GPUs are this process's CUDA_VISIBLE_DEVICES: children are pinned to those names
    monkeypatch.setattr(sweep, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert sweep.visible_gpus() == ["3", "5"]


class FakeGpuLaunch:
    """Stands in for the harness on a GPU box: each cell 'runs' for a moment, and the GPUs each was pinned to and
    which cells ran at once are noted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, set[str]] = {}
        self.pinned: dict[str, list[str]] = {}
        self.overlaps: list[set[str]] = []

    def __call__(self, cell: Cell, out: Path | None, timeout: float | None, env: dict[str, str]) -> Record:
        assert out is None  # the sweep appends, once it knows the cell was not interrupted
        gpus = env["CUDA_VISIBLE_DEVICES"].split(",")
        with self.lock:
            for other, theirs in self.running.items():
                assert not set(gpus) & theirs, f"{cell.optimizer} got {gpus}, which {other} holds"
            self.running[cell.optimizer] = set(gpus)
            self.pinned[cell.optimizer] = gpus
            self.overlaps.append(set(self.running))
        time.sleep(0.2)
        with self.lock:
            del self.running[cell.optimizer]
        return made(cell.optimizer, ranks=cell.ranks)


def test_on_a_gpu_box_concurrent_cells_get_gpus_of_their_own_and_a_two_rank_cell_two(tmp_path: Path) -> None:
    ranks = {"inference": 1, "mezo": 2, "sgd": 1, "adam": 1, "hizoo": 2}
    cells = [Cell("opt-tiny", o, "sst2", device="cuda", ranks=r, strategy="replicate" if r > 1 else None)
             for o, r in ranks.items()]
    launch = FakeGpuLaunch()
    out = tmp_path / "records.jsonl"
    done = sweep.run(cells, out, jobs=3, gpus=["3", "5", "7"], launch=launch)
    assert [r.optimizer for r in done] == [r.optimizer for r in records.read(out)] == list(ranks)
    assert {o: len(gpus) for o, gpus in launch.pinned.items()} == ranks
    assert all(set(gpus) <= {"3", "5", "7"} for gpus in launch.pinned.values())
    assert max(len(running) for running in launch.overlaps) >= 2
    with pytest.raises(UsageError, match="needs as many GPUs; 1 are visible"):
        sweep.run(cells, tmp_path / "other.jsonl", jobs=2, gpus=["0"], launch=launch)
    # a cell of two ranks is another cell than one of one: resuming does not take one for the other
    assert not sweep.matches(made("mezo"), dataclasses.replace(cells[1], device="cpu", steps=1, warmup=0))


def test_an_interrupted_concurrent_sweep_kills_the_cells_in_flight_and_keeps_the_finished(tmp_path: Path) -> None:
    started = threading.Event()
    children: list[multiprocessing.Process] = []

    def launch(cell: Cell, out: Path | None, timeout: float | None, env: dict[str, str] | None) -> Record:
        if cell.optimizer == "mezo":  # Ctrl-C, once the long cell is under way
            started.wait(30)
            raise KeyboardInterrupt
        if cell.optimizer == "sgd":  # a measuring child that would take a minute
            child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,),
                                                                 name=harness.CELL_PROCESS)
            child.start()
            harness._running.add(child)  # as the harness keeps each child it starts, for kill_cells
            children.append(child)
            started.set()
            child.join()
        return made(cell.optimizer)

    cells = [Cell("opt-tiny", o, "sst2", device="cpu") for o in ("inference", "sgd", "mezo")]
    out = tmp_path / "records.jsonl"
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cells, out, jobs=2, launch=launch)
    assert time.monotonic() - began < 30
    assert [r.optimizer for r in records.read(out)] == ["inference"]
    assert children[0].exitcode is not None and children[0].exitcode < 0


def test_shard_k_of_n_takes_every_nth_cell_in_plan_order() -> None:
    cells = sweep.plan(["opt-tiny"], ["inference", "mezo", "sgd"], ["sst2", "copa"], sweep.Settings(device="cpu"))
    shards = [cluster.shard(cells, k, 3) for k in (1, 2, 3)]
    assert [c.optimizer for c in shards[0]] == ["inference", "inference"]
    assert sorted(map(repr, sum(shards, []))) == sorted(map(repr, cells))
    with pytest.raises(UsageError, match="use at most 6 shards"):
        cluster.shard(cells, 7, 7)
    assert cluster.parse_shard("2/4") == (2, 4)
    for bad in ("0/2", "3/2", "1-2", "a/b", "2"):
        with pytest.raises(Exception, match="K/N"):
            cluster.parse_shard(bad)


def test_merge_keeps_identical_duplicates_once_lets_an_error_give_way_and_refuses_different_ones(
        tmp_path: Path) -> None:
    inference, mezo, adam = made("inference"), made("mezo"), made("adam")
    first = folder_of(tmp_path / "1", inference, made("mezo", status="error"), adam)
    second = folder_of(tmp_path / "2", mezo, inference)
    merged = cluster.merge([first, second])
    assert merged.records == [inference, mezo, adam]
    assert merged.sources == {first: 3, second: 2}
    # within one folder a later record of a cell replaces an earlier one, as the folder's own report does
    resumed = folder_of(tmp_path / "3", made("mezo", status="error"), mezo)
    assert cluster.merge([resumed]).records == [mezo]
    # an error is no answer: of two, the first is kept
    failed, failed_again = made("sgd", status="error"), dataclasses.replace(made("sgd", status="error"), error="x")
    assert cluster.merge([folder_of(tmp_path / "6", failed), folder_of(tmp_path / "7", failed_again)]).records == [
        failed]
    with pytest.raises(UsageError, match="no records to merge"):
        cluster.merge([folder_of(tmp_path / "8")])
    # the same cell measured twice, differently, is not one answer
    again = folder_of(tmp_path / "4", made("inference", peak_mib=120))
    with pytest.raises(UsageError, match=f"opt-tiny inference sst2 .* both {first} and {again}"):
        cluster.merge([first, again])
    with pytest.raises(UsageError, match="no records.jsonl"):
        cluster.merge([first, tmp_path / "missing"])
    three_steps = folder_of(tmp_path / "5", dataclasses.replace(made("sgd"), steps=3))
    with pytest.raises(UsageError, match=r"different steps \(1, 3\)"):
        cluster.settings_of(cluster.merge([first, three_steps]).records, {})


def test_sharded_runs_merged_give_the_tables_of_one_run(shared_cpu_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    one_run = records.read(shared_cpu_run / "records.jsonl")
    measured: list[str] = []

    def replay(cell: Cell, out: Path, timeout: float | None = None) -> Record:
        """The one run's record of ``cell``: each shard 'measures' exactly what the one run measured."""
        measured.append(cell.optimizer)
        record = next(r for r in one_run if sweep.matches(r, cell))
        records.append(out, record)
        return record

    monkeypatch.setattr(sweep, "run_cell", replay)
    shards = [tmp_path / "shard-1", tmp_path / "shard-2"]
    for k, folder in enumerate(shards, start=1):
        assert cli([*REPORT, "--shard", f"{k}/2", "--out", str(folder)]) == 0
        assert f"shard {k}/2" in (folder / "index.md").read_text()
    assert measured == ["inference", "mezo"]
    assert [r.optimizer for r in records.read(shards[0] / "records.jsonl")] == ["inference"]
    assert [r.optimizer for r in records.read(shards[1] / "records.jsonl")] == ["mezo"]
    merged = tmp_path / "merged"
    assert cli(["report", "--merge", *map(str, shards), "--hardware", "1xA100-80GB", "--out", str(merged)]) == 0
    for table in ("peak_memory.md", "step_time.md", "memory_breakdown.md", "largest_fit.md"):
        assert (merged / table).read_text() == (shared_cpu_run / table).read_text(), table
    index = (merged / "index.md").read_text()
    assert "## Merged folders" in index and "**Shared CPU**" in index and "different machines" not in index


def test_a_merge_names_its_machines_and_refuses_what_does_not_go_together(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = folder_of(tmp_path / "1", made("inference"), made("mezo"))
    second = folder_of(tmp_path / "2", made("adam", cpu="CPU B"), made("mezo"))
    merged = tmp_path / "merged"
    merge = ["report", "--merge", str(first), str(second), "--hardware", "1xA100-80GB", "--out", str(merged)]
    assert cli(merge) == 0
    assert [r.optimizer for r in records.read(merged / "records.jsonl")] == ["inference", "adam", "mezo"]
    assert "2 different machines: CPU A (2 cells); CPU B (1 cell)" in (merged / "index.md").read_text()
    capsys.readouterr()
    elsewhere = ["--out", str(tmp_path / "elsewhere")]
    refused = {
        "holds 3 records": merge,  # a folder with records is not overwritten without --resume
        "no records.jsonl": ["report", "--merge", str(first), str(tmp_path / "missing"), *elsewhere],
        "takes no --shard": [*merge, "--shard", "1/2"],
        "option of --executor": [*REPORT, "--shards", "2", *elsewhere],
        "needs --shards": [*REPORT, "--executor", "local", *elsewhere],
        "at most 2": [*REPORT, "--executor", "local", "--shards", "3", *elsewhere],
        "get no GPU": [*REPORT, "--device", "cuda", "--executor", "local", "--shards", "2", *elsewhere],
        "no Slurm on this machine": [*REPORT, "--executor", "slurm", "--shards", "2", *elsewhere],
        "unsharded report": [*REPORT, "--timeline", "--shard", "1/2", *elsewhere],
    }
    for said, argv in refused.items():
        assert cli(argv) == 2, said
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err
    assert cli([*merge, "--resume"]) == 0  # what the folder holds is merged too: the same records, kept once
    assert len(records.read(merged / "records.jsonl")) == 3
    assert not (tmp_path / "elsewhere" / "records.jsonl").exists()


def test_the_slurm_executor_submits_the_shards_as_one_array_job_with_the_resources_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as on a login node with srun
    scripts: list[str] = []

    def sbatch(self: SlurmExecutor, command: str) -> SlurmJob[Any]:
        scripts.append(self._make_submission_file_text(command, "uid"))
        return SlurmJob(folder=self.folder, job_id="4242", tasks=[0])

    monkeypatch.setattr(SlurmExecutor, "_submit_command", sbatch)
    executor = cluster.executor("slurm", tmp_path / "jobs", shards=2, partition="gpu-h100", gpus_per_task=8,
                                minutes=90)
    assert isinstance(executor, submitit.AutoExecutor)
    jobs = executor.map_array(shard_job, [SimpleNamespace(), SimpleNamespace()], [None, None])
    assert [job.job_id for job in jobs] == ["4242_0", "4242_1"]
    [script] = scripts
    for line in ("--array=0-1%2", "--partition=gpu-h100", "--gpus-per-task=8", "--time=90", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in script, line


def test_failed_shard_jobs_are_named_with_what_they_said_and_their_log(tmp_path: Path) -> None:
    log = tmp_path / "7_0_log.err"
    log.write_text("cells: 0%\nTraceback (most recent call last):\nzomem.errors.UsageError: no GPU\nsubmitit ERROR\n")
    ok = SimpleNamespace(exception=lambda: None)
    failed = SimpleNamespace(exception=lambda: RuntimeError("failed"), job_id="7", paths=SimpleNamespace(stderr=log))
    assert cluster.failures([ok, failed]) == [f"shard 2/2 (job 7) failed: zomem.errors.UsageError: no GPU (log: {log})"]


def test_the_local_executor_runs_a_two_shard_sweep_end_to_end(shared_cpu_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    # shard 1 finished in an earlier submission; the resumed one measures shard 2 only, in its own job
    [inference, _] = records.read(shared_cpu_run / "records.jsonl")
    folder_of(out / "shards" / "1", inference)
    assert cli([*REPORT, "--executor", "local", "--shards", "2", "--resume", "--out", str(out)]) == 0
    assert records.read(out / "shards" / "1" / "records.jsonl") == [inference]
    [mezo] = records.read(out / "shards" / "2" / "records.jsonl")
    assert mezo.optimizer == "mezo" and mezo.status == "ok" and "cells_at_once" not in mezo.env
    assert records.read(out / "records.jsonl") == [inference, mezo]
    assert len(list((out / "jobs").glob("*_log.err"))) == 2
    assert "## Merged folders" in (out / "index.md").read_text()
    assert [line.split("|")[1].strip() for line in (out / "peak_memory.md").read_text().splitlines()[4:6]] == [
        "inference", "mezo"]
