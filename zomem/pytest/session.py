"""Run-wide state of the plugin, read once from the options: the grid of cells, what the tests
measured, and the baseline it is saved as or compared against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from zomem import compare
from zomem.compare import Baseline, Comparison, Measurement, Run, Threshold

if TYPE_CHECKING:
    from zomem.cell import Cell


@dataclass(frozen=True)
class Grid:
    """The cells ``zomem_cell`` is parametrised over: one model, tuning, dtype, precision and device; optimizers ×
    workloads."""

    model: str
    device: str
    dtype: str
    tuning: str
    #: None: every name registered when the tests are collected (plug-ins included)
    optimizers: tuple[str, ...] | None
    workloads: tuple[str, ...] | None
    rounds: int
    warmup: int
    precision: str = "pure"
    #: gradient checkpointing for the first-order methods (the others run no backward)
    checkpointing: bool = False
    #: processes (devices) per cell, and how they share the model
    ranks: int = 1
    strategy: str | None = None

    def cells(self) -> list[Cell]:
        """Every cell, validated: an unknown name or a missing GPU fails collection before anything is built."""
        # Imported here: the plugin loads in every pytest run, and these pull in torch and transformers.
        from zomem import models, optim, workloads
        from zomem.cell import Cell
        from zomem.errors import UsageError

        optimizers = self.optimizers or tuple(optim.OPTIMIZERS.names())
        try:
            positions = models.spec(self.model).positions
            # By default, every registered workload the model can take: long4096 is for the long-context families.
            names = self.workloads or tuple(w for w in workloads.WORKLOADS.names()
                                            if workloads.get(w).seq_len <= positions)
            return [Cell(model=self.model, optimizer=o, workload=w, tuning=self.tuning, dtype=self.dtype,
                         precision=self.precision, device=self.device, steps=self.rounds,
                         warmup=self.warmup,
                         checkpointing=self.checkpointing and not optim.forward_only(optim.get(o)),
                         ranks=self.ranks, strategy=self.strategy).validated()
                    for o in optimizers for w in names]
        except UsageError as exc:
            # A collection error with the message alone: the test file that asked for the grid names it.
            pytest.fail(f"zomem grid: {exc}", pytrace=False)


def baseline_path(name: str, storage: Path) -> Path:
    """Where baseline ``name`` lives: ``storage/NAME.json``, or ``name`` itself when it is a path to a file."""
    path = Path(name)
    return path if path.suffix in (".json", ".jsonl") or len(path.parts) > 1 else storage / f"{name}.json"


class ZomemSession:
    """The grid, the measurements of this run, and the baseline work done when the run ends."""

    def __init__(self, grid: Grid, storage: Path, save: str | None = None, compare_with: str | None = None,
                 thresholds: tuple[Threshold, ...] = ()) -> None:
        if thresholds and not compare_with:
            raise pytest.UsageError("--zomem-fail needs --zomem-compare NAME: the baseline to compare against")
        self.grid = grid
        self.save_path = baseline_path(save, storage) if save else None
        self.thresholds = thresholds
        self.baseline: Run | None = None
        if compare_with:
            path = baseline_path(compare_with, storage)
            if not path.exists():
                raise pytest.UsageError(f"--zomem-compare: no baseline at {path}; "
                                        f"save one first with --zomem-save {compare_with}")
            self.baseline = compare.load(path)
        self.measurements: list[Measurement] = []
        self.machine: dict[str, object] = {}
        self.comparison: Comparison | None = None
        self._cells: list[Cell] | None = None

    @classmethod
    def from_config(cls, config: pytest.Config) -> ZomemSession:
        """The session the command line asks for."""
        option = config.getoption
        grid = Grid(option("zomem_model"), option("zomem_device"), option("zomem_dtype"), option("zomem_tuning"),
                    option("zomem_optimizers"), option("zomem_workloads"), option("zomem_rounds"),
                    option("zomem_warmup"), option("zomem_precision"), option("zomem_checkpointing"),
                    option("zomem_ranks"), option("zomem_strategy"))
        return cls(grid, Path(option("zomem_storage")), option("zomem_save"), option("zomem_compare"),
                   option("zomem_fail"))

    def cells(self) -> list[Cell]:
        """The grid's cells, validated once per run."""
        if self._cells is None:
            self._cells = self.grid.cells()
        return self._cells

    def add(self, measurement: Measurement, machine: dict[str, object] | None = None) -> None:
        """Keep a test's measurement for the baseline; ``machine`` says what measured it."""
        self.measurements.append(measurement)
        if machine and not self.machine:
            self.machine = machine

    def finish(self) -> None:
        """Compare with the baseline, then save this run's measurements (not an empty run: it would erase one)."""
        current = {m.name: m for m in self.measurements}
        if self.baseline is not None:
            self.comparison = compare.compare(self.baseline.measurements, current, self.thresholds)
        if self.save_path and self.measurements:
            Baseline(self.measurements, compare.now(), self.machine).save(self.save_path)

    @property
    def failed(self) -> bool:
        """Whether the comparison found a regression."""
        return self.comparison is not None and self.comparison.failed

    def display(self, terminal: pytest.TerminalReporter) -> None:
        """The baseline section of the terminal summary: the comparison table and what was saved."""
        if self.baseline is None and self.save_path is None:
            return
        terminal.write_sep("-", "zomem memory baseline")
        if self.baseline is not None and self.comparison is not None:
            terminal.write_line(f"compared with {self.baseline.path} ({self.baseline.kind})")
            terminal.write_line(self.comparison.table())
            verdict = "FAILED: " if self.comparison.failed else "ok: "
            terminal.write_line(verdict + self.comparison.summary(), red=self.comparison.failed, bold=True)
        if self.save_path is not None:
            if self.measurements:
                terminal.write_line(f"saved {len(self.measurements)} measurement(s) to {self.save_path}")
            else:
                terminal.write_line(f"nothing measured: {self.save_path} left as it was", yellow=True)
