"""The optimizers zomem measures, and the registry that names them.

Built-ins are registered here; third-party optimizers register through the entry point group
``zomem.optimizers`` or are named directly as ``module:Class``. Any ``torch.optim.Optimizer`` whose
``step(closure)`` calls the closure works; a class attribute ``forward_only = True`` tells the harness
to run the closure under no_grad without backward (zeroth-order methods), otherwise it calls backward;
``state_copies`` says how many copies of the trainable parameters its persistent state holds.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from zomem.errors import UsageError
from zomem.optim.adamezo import AdaMeZO
from zomem.optim.base import ZerothOrder, decay_groups, mix, state_bytes, state_dtype
from zomem.optim.first_order import SGD, Adam, Inference
from zomem.optim.forward_grad import ForwardGrad
from zomem.optim.hizoo import HiZOO
from zomem.optim.mezo import MeZO
from zomem.optim.zo_adam import ZOAdam
from zomem.optim.zo_adamu import ZOAdaMU, anneal
from zomem.optim.zo_sgd import ZOSGDConservative, ZOSGDMomentum, ZOSGDSign
from zomem.registry import Registry, load_object

__all__ = ["BUILTIN", "OPTIMIZERS", "SGD", "AdaMeZO", "Adam", "ForwardGrad", "HiZOO", "Inference", "MeZO", "ZOAdaMU",
           "ZOAdam", "ZOSGDConservative", "ZOSGDMomentum", "ZOSGDSign", "ZerothOrder", "anneal", "create",
           "decay_groups", "forward_only", "get", "mix", "state_bytes", "state_dtype"]

OPTIMIZERS: Registry[type[Optimizer]] = Registry("optimizer", entry_point_group="zomem.optimizers")
#: SPEC §4's table, in its order
BUILTIN: dict[str, type[Optimizer]] = {
    "inference": Inference, "mezo": MeZO, "zo-sgd-mmt": ZOSGDMomentum, "zo-adam": ZOAdam, "zo-sgd-sign": ZOSGDSign,
    "zo-sgd-cons": ZOSGDConservative, "forward-grad": ForwardGrad, "zo-adamu": ZOAdaMU, "hizoo": HiZOO,
    "adamezo": AdaMeZO, "sgd": SGD, "adam": Adam,
}
for _name, _cls in BUILTIN.items():
    OPTIMIZERS.register(_name, _cls)


def get(name: str) -> type[Optimizer]:
    """The optimizer class for a registered name or a ``module:Class`` spec."""
    cls = load_object(name) if ":" in name else OPTIMIZERS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise UsageError(f"{name!r} is not a torch.optim.Optimizer subclass")
    return cls


def forward_only(cls: type[Optimizer]) -> bool:
    """Whether the optimizer needs only forward passes (its closure runs under no_grad)."""
    return bool(getattr(cls, "forward_only", False))


def create(name: str, params: Any, **hparams: Any) -> Optimizer:
    """Build the optimizer registered as ``name`` over ``params``; bad hyper-parameters are a UsageError."""
    cls = get(name)
    try:
        return cls(params, **hparams)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot build optimizer {name!r} with {hparams}: {exc}") from exc
