"""Shared test set-up: GPU-only tests are skipped where no CUDA device is visible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zomem.optim import OPTIMIZERS

PLUGINS = Path(__file__).parent / "plugins"
FAULTS = Path(__file__).parent / "faults"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def plugin_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the test plug-ins (optimizers defined outside the package) on the path of this process and its children."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", str(PLUGINS))
    # The registry reads entry points once per process: an earlier test may have read them before this path existed.
    monkeypatch.setattr(OPTIMIZERS, "_entries", dict(OPTIMIZERS._entries))
    monkeypatch.setattr(OPTIMIZERS, "_entry_points_loaded", False)
    return PLUGINS


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the optimizers that fail on purpose (tests/faults) on the path of this process and its children."""
    monkeypatch.syspath_prepend(str(FAULTS))
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
