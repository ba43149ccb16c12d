"""The optimizers zomem measures, and the registry that names them.

Built-ins are registered here; third-party optimizers register through the entry point group
``zomem.optimizers`` or are named directly as ``module:Class``. Any ``torch.optim.Optimizer`` whose
``step(closure)`` calls the closure works; a class attribute ``forward_only = True`` tells the harness
to run the closure under no_grad without backward (zeroth-order methods), otherwise it calls backward;
``state_copies`` says how many copies of the trainable parameters its persistent state holds (a method whose state is
sized by factors instead, LOZO-M's or SubZero's, gives ``state_elements(shapes, hparams)``: its elements for
parameters of those shapes; one that picks parameters by name, GaLore's or Adam-mini's, ``named_state_elements(named
shapes, hparams, config)``). ``fused_backward =
True`` says the update runs inside backward (LOMO's), ``takes_config = True`` that the class is built with the model's
transformers config as ``config`` (Adam-mini's), and ``load_package(hparams)`` imports a package it wraps.
"""

from __future__ import annotations

import contextlib
import types
import typing
from typing import Any

import torch
from torch.optim import Optimizer

from zomem.errors import UsageError
from zomem.optim.adafactor import Adafactor
from zomem.optim.adam_mini import AdamMini
from zomem.optim.adamezo import AdaMeZO
from zomem.optim.adamw_8bit import AdamW8bit
from zomem.optim.base import ZerothOrder, decay_groups, mix, state_bytes, state_dtype
from zomem.optim.first_order import SGD, Adam, Inference
from zomem.optim.forward_grad import ForwardGrad
from zomem.optim.fused import LOMO, AdaLomo
from zomem.optim.fzoo import FZOO
from zomem.optim.galore import GaLore
from zomem.optim.hizoo import HiZOO
from zomem.optim.lezo import LeZO
from zomem.optim.lozo import LOZO, LOZOMomentum
from zomem.optim.mezo import MeZO
from zomem.optim.mezo_svrg import MeZOSVRG
from zomem.optim.packages import PackageUnavailable
from zomem.optim.sparse_mezo import SparseMeZO
from zomem.optim.subzero import SubZero
from zomem.optim.zo_adam import ZOAdam
from zomem.optim.zo_adamu import ZOAdaMU, anneal
from zomem.optim.zo_sgd import ZOSGDConservative, ZOSGDMomentum, ZOSGDSign
from zomem.registry import Registry, load_object

__all__ = ["BUILTIN", "FZOO", "LOMO", "LOZO", "OPTIMIZERS", "SGD", "AdaLomo", "AdaMeZO", "Adafactor", "Adam",
           "AdamMini", "AdamW8bit", "ForwardGrad", "GaLore", "HiZOO", "Inference", "LOZOMomentum", "LeZO", "MeZO",
           "MeZOSVRG", "PackageUnavailable", "SparseMeZO", "SubZero", "ZOAdaMU", "ZOAdam", "ZOSGDConservative",
           "ZOSGDMomentum", "ZOSGDSign", "ZerothOrder", "anneal", "check", "create", "decay_groups", "forward_only",
           "fused_backward", "get", "load_package", "mix", "shardable", "state_bytes", "state_dtype"]

OPTIMIZERS: Registry[type[Optimizer]] = Registry("optimizer", entry_point_group="zomem.optimizers")
#: SPEC §4's table, in its order
BUILTIN: dict[str, type[Optimizer]] = {
    "inference": Inference, "mezo": MeZO, "zo-sgd-mmt": ZOSGDMomentum, "zo-adam": ZOAdam, "zo-sgd-sign": ZOSGDSign,
    "zo-sgd-cons": ZOSGDConservative, "forward-grad": ForwardGrad, "zo-adamu": ZOAdaMU, "hizoo": HiZOO,
    "adamezo": AdaMeZO, "sgd": SGD, "adam": Adam, "lozo": LOZO, "lozo-m": LOZOMomentum, "subzero": SubZero,
    "sparse-mezo": SparseMeZO, "lezo": LeZO, "fzoo": FZOO, "mezo-svrg": MeZOSVRG, "adafactor": Adafactor,
    "adalomo": AdaLomo, "lomo": LOMO, "galore": GaLore, "adamw-8bit": AdamW8bit, "adam-mini": AdamMini,
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


def shardable(cls: type[Optimizer]) -> bool:
    """Whether the optimizer runs on FSDP-sharded parameters (DTensors), each rank updating its shards."""
    return bool(getattr(cls, "shardable", False))


def fused_backward(cls: type[Optimizer]) -> bool:
    """Whether the optimizer updates inside backward, freeing each gradient as it is applied (LOMO's)."""
    return bool(getattr(cls, "fused_backward", False))


def create(name: str, params: Any, *, config: Any = None, **hparams: Any) -> Optimizer:
    """Build the optimizer registered as ``name`` over ``params`` (named parameters, as ``decay_groups`` gives them,
    for methods that pick parameters by name); a class that ``takes_config`` also gets the model's transformers
    ``config``. Bad hyper-parameters are a UsageError; a wrapped package that cannot load, PackageUnavailable."""
    cls = get(name)
    extra = {"config": config} if getattr(cls, "takes_config", False) else {}
    try:
        return cls(params, **hparams, **extra)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot build optimizer {name!r} with {hparams}: {wrong_type(cls, hparams) or exc}") from exc


def check(name: str, dtype: torch.dtype, hparams: dict[str, Any], config: Any = None) -> None:
    """Refuse bad hyper-parameters, or weights of a dtype the optimizer refuses, allocating nothing: the optimizer is
    built over one meta parameter. A wrapped package that cannot load here passes: its cell runs and records why."""
    with contextlib.suppress(PackageUnavailable):
        create(name, [torch.nn.Parameter(torch.empty(1, device="meta", dtype=dtype))], config=config, **hparams)


def load_package(name: str, hparams: dict[str, Any]) -> None:
    """Import the package the optimizer wraps, if any (PackageUnavailable where it cannot load): a measuring child
    does it before its baseline reading, so the package's libraries are part of the process floor."""
    loader = getattr(get(name), "load_package", None)
    if loader is not None:
        loader(hparams)


def _accepts(hint: Any, value: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float):  # JSON reads 1 as an int, and an int is a fine float; a bool is neither here
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if hint in (tuple, list) or typing.get_origin(hint) in (tuple, list):
        return isinstance(value, (tuple, list))
    return True  # a type this check does not know: the optimizer's own validation speaks


def _words(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_words(arg) for arg in typing.get_args(hint))
    if hint in (tuple, list) or typing.get_origin(hint) in (tuple, list):
        return "a list"
    words = {float: "a number", int: "an integer", str: "text", bool: "true or false", type(None): "null"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def wrong_type(cls: type[Optimizer], hparams: dict[str, Any]) -> str | None:
    """In words, a hyper-parameter whose value is not of the type the optimizer's signature declares (a number given
    as text, say); None where each fits, or the signature declares none."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: nothing to check against
        return None
    for key, value in hparams.items():
        if key in hints and not _accepts(hints[key], value):
            return f"hyper-parameter {key} takes {_words(hints[key])}, got {value!r} ({_words(type(value))})"
    return None
