import json
from pathlib import Path

import pytest

from zomem import records
from zomem.records import Record, RecordsError


def make(optimizer: str = "mezo", **fields: object) -> Record:
    return Record(model="opt-tiny", optimizer=optimizer, workload="sst2", tuning="full", dtype="float32",
                  device="cpu", batch_size=16, seq_len=64, **fields)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    first = make(peak_bytes={"cpu_hwm": 123}, step_seconds={"median": 0.5, "iqr": 0.1, "n": 3})
    records.append(path, first)
    records.append(path, make("adam", status="oom", error="CUDA out of memory"))
    back = records.read(path)
    assert back[0] == first and back[1].status == "oom"
    assert path.read_text().count("\n") == 2


def test_corrupt_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    records.append(path, make())
    with path.open("a") as f:
        f.write('{"model": "opt-tiny", "optim')  # a run killed mid-write by hand
    with pytest.raises(RecordsError, match=r"r.jsonl:2"):
        records.read(path)


def test_unknown_field_is_not_silently_dropped(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    data = json.loads(make().to_json()) | {"peak": 1}
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(RecordsError, match="unknown record fields: peak"):
        records.read(path)


def test_write_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    records.append(path, make())
    records.write(path, [make("adam"), make("sgd")])
    assert [r.optimizer for r in records.read(path)] == ["adam", "sgd"]
