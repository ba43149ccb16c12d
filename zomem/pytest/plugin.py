"""zomem's pytest plugin (entry point ``pytest11``): options and hooks.

- ``--zomem-model/-device/-dtype/-precision/-tuning/-checkpointing/-optimizers/-workloads`` shape the grid a test gets
  by asking for the ``zomem_cell`` argument (one test per optimizer × workload).
- The ``zomem`` fixture measures cells (:mod:`zomem.pytest.fixture`).
- ``@pytest.mark.zomem_limit("6 GiB", probe="nvml")`` fails a test whose measured peak exceeds the limit.
- ``--zomem-save NAME`` stores the run's peaks; ``--zomem-compare NAME --zomem-fail "peak:+2%"`` fails the
  session on a regression and prints a table of what changed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import pytest

from zomem import compare
from zomem.strategies import STRATEGIES
from zomem.pytest import marks
from zomem.pytest.fixture import ZomemFixture
from zomem.pytest.session import ZomemSession

if TYPE_CHECKING:
    from zomem.cell import Cell

SESSION = pytest.StashKey[ZomemSession]()
FIXTURE = pytest.StashKey[ZomemFixture]()
LIMIT_MARKER = "zomem_limit"


def parse_names(text: str) -> tuple[str, ...]:
    """Comma-separated names, ``mezo,adam``; a ``custom:batch=8,seq=512`` workload keeps its own commas."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if "=" in part and ":" not in part and names and names[-1].startswith("custom:"):
            names[-1] += f",{part}"  # the next key=value of the custom workload before it
        elif part:
            names.append(part)
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, e.g. mezo,adam; got {text!r}")
    return tuple(names)


def _parse_int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def parse_rounds(text: str) -> int:
    """Timed rounds: at least one."""
    return _parse_int(text, 1)


def parse_warmup(text: str) -> int:
    """Warm-up rounds: zero or more."""
    return _parse_int(text, 0)


def add_grid_options(addoption: Callable[..., Any]) -> None:
    """The options that shape the grid of cells ``zomem_cell`` is parametrised over."""
    addoption("--zomem-model", default="opt-125m", metavar="NAME", help="model to benchmark (default: opt-125m)")
    addoption("--zomem-device", default="auto", metavar="DEVICE",
              help="auto, cpu, cuda or cuda:N (default: auto, a GPU when one is visible)")
    addoption("--zomem-dtype", default="float32", metavar="DTYPE",
              help="float32, float16 or bfloat16 (default: float32)")
    addoption("--zomem-precision", default="pure", choices=["pure", "mixed"],
              help="pure: every tensor in --zomem-dtype (default); mixed: float32 weights, forwards under autocast")
    addoption("--zomem-tuning", default="full", metavar="MODE",
              help="what is trained: full, lora or prefix (default: full)")
    addoption("--zomem-checkpointing", action="store_true",
              help="gradient checkpointing for the grid's first-order methods (layers recompute activations)")
    addoption("--zomem-ranks", type=parse_rounds, default=1, metavar="N",
              help="run each cell as N processes, one per device (default: 1); their step is timed by rank 0")
    addoption("--zomem-strategy", default=None, choices=list(STRATEGIES),
              help="how the ranks share the model (default: fsdp with --zomem-ranks above 1)")
    addoption("--zomem-optimizers", type=parse_names, default=None, metavar="NAMES",
              help="comma-separated optimizers (default: every registered one the model's positions take)")
    addoption("--zomem-workloads", type=parse_names, default=None, metavar="NAMES",
              help="comma-separated workloads, custom:batch=B,seq=S allowed (default: every registered one the model's "
                   "positions take)")
    addoption("--zomem-rounds", type=parse_rounds, default=5, metavar="N",
              help="timed steps per benchmark, and measured steps in the memory child (default: 5)")
    addoption("--zomem-warmup", type=parse_warmup, default=1, metavar="N",
              help="untimed warm-up steps before timing and before peaks are reset (default: 1)")


def add_baseline_options(addoption: Callable[..., Any]) -> None:
    """The options that save this run's peaks, or compare them with a saved run."""
    addoption("--zomem-storage", default=".benchmarks/zomem", metavar="DIR",
              help="where baselines named by --zomem-save/--zomem-compare live (default: .benchmarks/zomem)")
    addoption("--zomem-save", default=None, metavar="NAME",
              help="save the peaks and step times measured in this run as DIR/NAME.json (or NAME, a .json path)")
    addoption("--zomem-compare", default=None, metavar="NAME",
              help="compare this run with a saved baseline (or with a records or pytest-benchmark JSON file)")
    compare.add_fail_option(addoption, "--zomem-fail", "")


def cell_id(cell: Cell) -> str:
    """A test id for a grid cell; model, tuning, dtype and device are the same across the grid (see the group)."""
    return f"{cell.optimizer}-{cell.workload}"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zomem", "zomem: peak memory and step time of fine-tuning optimizers")
    add_grid_options(group.addoption)
    add_baseline_options(group.addoption)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{LIMIT_MARKER}(limit, probe=None): fail the test when a peak it measured through the zomem fixture "
        f"exceeds limit (e.g. '6 GiB'); probe names one of {', '.join(compare.PROBES)}, else every probe counts",
    )
    config.stash[SESSION] = ZomemSession.from_config(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zomem_cell" in metafunc.fixturenames:
        cells = metafunc.config.stash[SESSION].cells()
        metafunc.parametrize("zomem_cell", cells, ids=[cell_id(c) for c in cells])


@pytest.fixture
def zomem(request: pytest.FixtureRequest) -> ZomemFixture:
    """Measure cells (``zomem.benchmark_step``, ``zomem.measure``) or report peaks (``zomem.report_peaks``)."""
    fixture = ZomemFixture(request.node.nodeid, request.config.stash[SESSION])
    request.node.stash[FIXTURE] = fixture
    return fixture


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A malformed limit is reported before the test spends minutes measuring.
    marker = item.get_closest_marker(LIMIT_MARKER)
    if marker is not None:
        try:
            marks.parse_limit(*marker.args, **marker.kwargs)
        except (TypeError, ValueError) as exc:
            pytest.fail(f"bad {LIMIT_MARKER} marker: {exc}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                             pytest.TestReport]:
    report = yield
    marker = item.get_closest_marker(LIMIT_MARKER)
    if marker is None or call.when != "call" or not report.passed:
        return report
    fixture = item.stash.get(FIXTURE, None)
    failure = marks.limit_peak(*marker.args, **marker.kwargs,
                               _measurements=fixture.measurements if fixture else [])
    if failure is not None:
        report.outcome = "failed"
        report.longrepr = failure.long_repr
        report.sections.append(failure.section)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash[SESSION]
    state.finish()
    if state.failed and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.config.stash[SESSION].display(terminalreporter)
