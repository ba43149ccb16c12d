"""An optimizer defined outside the package (tests/plugins) is measured exactly like a built-in one, whether it is
named through the ``zomem.optimizers`` entry point or as ``module:Class``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from zomem.cell import Cell
from zomem.harness import run_cell
from zomem.records import Record


def check_measured(record: Record, name: str) -> None:
    assert record.status == "ok", record.error
    assert record.optimizer == name
    assert record.forwards_per_step == 2
    assert {"perturb", "forward", "update"} <= record.phases.keys()
    assert record.breakdown["optimizer_state"] == 0 and record.hparams["clip"] == 100.0


def test_entry_point_through_the_cli(plugin_path: Path, tmp_path: Path) -> None:
    # A fresh `zomem` process finds the plug-in by its entry point, exactly as an installed package would.
    out = tmp_path / "runs.jsonl"
    command = [sys.executable, "-m", "zomem", "run", "--model", "opt-tiny", "--optimizer", "clipped-zo",
               "--workload", "sst2", "--device", "cpu", "--steps", "1", "--warmup", "0", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    check_measured(Record.from_dict(json.loads(out.read_text())), "clipped-zo")


def test_module_class_spec(plugin_path: Path) -> None:
    name = "zomem_test_plugin:ClippedZO"
    check_measured(run_cell(Cell(model="opt-tiny", optimizer=name, workload="sst2", device="cpu", steps=1,
                                 warmup=0)), name)
