"""Optimizers that maintained packages implement, behind zomem's interface.

A package is imported when its optimizer is built (and by a measuring child before its baseline reading, so that the
package's libraries count as the process floor, not as memory of the step), never when zomem is: bitsandbytes alone
costs seconds and 100 MiB. A package that cannot load here raises :class:`PackageUnavailable`: the cell still runs,
and its record says why (status ``error``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer


class PackageUnavailable(RuntimeError):
    """A package an optimizer wraps cannot be loaded here; the message names the package and the reason."""


def require(module: str, package: str, method: str) -> ModuleType:
    """Import ``module`` (of the PyPI package ``package``) for ``method``, or raise :class:`PackageUnavailable`."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a native library that fails to load as it is imported
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        message = f"{method} needs the {package} package, which cannot be loaded here: {reason}"
        raise PackageUnavailable(message) from exc


#: parameter groups as (their options, their parameters with names or None)
Groups = list[tuple[dict[str, Any], list[tuple[str | None, torch.Tensor]]]]


def named_groups(params: Any) -> Groups:
    """Parameter groups as (their options, their parameters with names): what torch accepts as ``params`` (tensors,
    (name, tensor) pairs, or dicts of either under ``params``), names None where none were given."""
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    out = []
    for group in groups:
        options = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        members = list(group["params"])
        names = group.get("param_names", [None] * len(members))
        pairs = [m if isinstance(m, tuple) else (name, m) for m, name in zip(members, names, strict=True)]
        out.append((options, pairs))
    return out


class PackageOptimizer(Optimizer):
    """A package's optimizer behind zomem's interface: the package's own optimizer (``inner``) does the work, and this
    one shares its state and parameter groups, so the harness, a gradient scaler and ``state_dict`` see the package's.
    ``defaults`` carries zomem's hyper-parameters (the record's ``hparams``), the package's own beside them."""

    forward_only: ClassVar[bool] = False

    @classmethod
    def load_package(cls, hparams: dict[str, Any]) -> ModuleType:
        """Import the package this optimizer wraps with these hyper-parameters; :class:`PackageUnavailable` where it
        cannot load."""
        raise NotImplementedError

    def __init__(self, inner: Optimizer, hparams: dict[str, Any]) -> None:
        self.inner = inner
        super().__init__([p for group in inner.param_groups for p in group["params"]], {**inner.defaults, **hparams})
        self.param_groups, self.state = inner.param_groups, inner.state

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One step of the package's optimizer (it runs ``closure`` with gradients enabled)."""
        if closure is None:
            return self.inner.step()
        return self.inner.step(lambda: _with_grad(closure))

    def state_dict(self) -> dict[str, Any]:
        """The package's state dict: what it needs to resume."""
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the package's optimizer, and share its new state and groups again."""
        self.inner.load_state_dict(state_dict)
        self.param_groups, self.state = self.inner.param_groups, self.inner.state


def _with_grad(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    # some packages call the closure inside their no_grad step (galore-torch's AdamW does)
    with torch.enable_grad():
        return closure()


def flat(groups: Groups) -> list[tuple[str, torch.Tensor]]:
    """Every parameter with a name, in order; an unnamed one is called ``tensorJ`` (J its position)."""
    pairs = [pair for _, members in groups for pair in members]
    return [(name if name is not None else f"tensor{j}", param) for j, (name, param) in enumerate(pairs)]
