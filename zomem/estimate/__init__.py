"""The estimator: predicted peak bytes per device for a cell, measured or not, for any causal LM.

peak = per-device overhead + weights + optimizer state + gradients + autocast cache + transient. The transient
is the largest of what each phase of a step holds beyond those parts: a forward-only method's forwards (traced:
the most a forward of the workload keeps alive, plus the z and scratch blocks its walk holds through the
forwards) or its update pass (the walk's blocks alone); backprop's forward and the start of its backward (every
layer's saved activations, the logits and their gradient: traced), or its optimizer step (the gradients and the
update's temporaries), and the rest of its backward (a checkpointed layer's recomputed activations, a tied
embedding's two gradients summed). A checkpointed backward is traced checkpointed, and an optimizer that updates inside
backward (LOMO's) keeps no gradients: its trace frees each as it is made. What a forward and backward keep is traced on
fake tensors (:mod:`tracing`), so no family's constants are built in; the multipliers that turn traced bytes into what
a probe sees come from a calibration per device kind (:mod:`calibration`). Several GPUs: forward-only methods are
placed layer by layer by accelerate on the meta model (:mod:`placement`); first-order methods are sharded as FSDP
shards them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from zomem import models, optim, strategies, workloads
from zomem.cell import HALF_DTYPES, check_checkpointing, check_precision
from zomem.errors import UsageError
from zomem.estimate import placement
from zomem.estimate.calibration import CALIBRATION_DIR, DEVICE_KINDS, PROBE, Calibration, device_kind
from zomem.estimate.counts import FLOAT32_BYTES, Shape, meta_model, shape
from zomem.estimate.parts import DevicePeak, Estimate, Linear, Persistent, Precision
from zomem.estimate.tracing import Moment, Trace, trace
from zomem.optim.base import STATE_DTYPES, compute_dtype, resolve_block_size

__all__ = ["CALIBRATION_DIR", "DEVICE_KINDS", "PRECISIONS", "PROBE", "SCALER_BYTES", "SHAPING_HPARAMS",
           "Calibration", "DevicePeak", "Estimate", "Linear", "Moment", "Shape", "Trace", "block_bytes", "decompose",
           "default_strategy", "device_kind", "estimate", "meta_model", "peak_phase", "persistent_per_param",
           "resolve_precision", "shape", "shaping", "trace"]

PRECISIONS: tuple[Precision, ...] = ("pure", "mixed")
#: a float16 gradient scaler's state: the scale, its growth tracker and one found-inf flag, 4 bytes each
SCALER_BYTES = 12
#: the hyper-parameters that change what a cell keeps: the state's dtype, Adam's implementation, a walk's block, a
#: low-rank method's rank
SHAPING_HPARAMS = ("state_dtype", "implementation", "block_size", "rank")


def shaping(hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters among ``hparams`` that change what a cell keeps (:data:`SHAPING_HPARAMS`)."""
    return {k: hparams[k] for k in SHAPING_HPARAMS if k in hparams}


def resolve_precision(optimizer: str, dtype: str, precision: str | None = None) -> Precision:
    """``mixed`` for first-order methods in a half dtype (float32 weights, autocast), else ``pure``."""
    if precision is None:
        half = dtype in HALF_DTYPES
        return "mixed" if half and not optim.forward_only(optim.get(optimizer)) else "pure"
    check_precision(precision, dtype)
    return precision  # type: ignore[return-value]


def persistent_per_param(optimizer: str, dtype: str, precision: Precision,
                         hparams: dict[str, Any] | None = None, model: str | None = None,
                         tuning: str = "full") -> Persistent:
    """Weights in ``dtype`` (float32 in mixed precision); gradients in the weights' dtype for first-order methods
    (none for one that frees each in backward); state in ``state_dtype`` when the optimizer takes one, else in its
    ``state_itemsize`` (8-bit moments) or the weights' dtype. A state sized by low-rank factors (the optimizer's
    ``state_elements``, or ``named_state_elements`` where it picks parameters by name) is counted from the
    parameters ``model`` trains when tuned as ``tuning``."""
    cls = optim.get(optimizer)
    weights = FLOAT32_BYTES if precision == "mixed" else models.dtype(dtype).itemsize
    state_dtype = (hparams or {}).get("state_dtype")
    state_width = STATE_DTYPES[state_dtype].itemsize if state_dtype else getattr(cls, "state_itemsize", weights)
    copies = float(getattr(cls, "state_copies", 0.0))
    elements = getattr(cls, "state_elements", None)
    named = getattr(cls, "named_state_elements", None)
    meta = None if model is None else meta_model(model, tuning)
    trained = [] if meta is None else [(n, p) for n, p in meta.named_parameters() if p.requires_grad]
    if meta is not None and named is not None:
        named_shapes = [(name, tuple(p.shape)) for name, p in trained]
        copies = named(named_shapes, hparams or {}, meta.config) / shape(model, tuning).trainable
    elif elements is not None and model is not None:
        copies = elements([tuple(p.shape) for _, p in trained], hparams or {}) / shape(model, tuning).trainable
    gradients = 0.0 if optim.forward_only(cls) or optim.fused_backward(cls) else weights
    return Persistent(weights, state_width * copies, gradients)


def block_bytes(optimizer: str, s: Shape, dtype: str, precision: Precision, device: str,
                hparams: dict[str, Any] | None = None) -> int:
    """One block of a zeroth-order walk (its z or a scratch buffer), in the compute dtype; 0 for other methods."""
    if not issubclass(optim.get(optimizer), optim.ZerothOrder):
        return 0
    hparams = hparams or {}
    size = resolve_block_size(hparams.get("block_size", "auto"), torch.device(device_kind(device)))
    weights = models.dtype("float32" if precision == "mixed" else dtype)
    return min(size or s.largest_tensor, s.largest_tensor) * compute_dtype(weights, hparams.get("state_dtype")).itemsize


def step_temporary(optimizer: str, s: Shape, weight_width: float, hparams: dict[str, Any] | None = None,
                   device: str = "cuda") -> float:
    """Bytes a first-order update allocates beside the gradients on ``device``'s kind: its ``step_temporaries``
    (copies of all the parameters, and of the largest tensor), for torch's Adam implementations say."""
    temporaries = getattr(optim.get(optimizer), "step_temporaries", None)
    if temporaries is None:
        return 0.0
    everything, largest = temporaries(hparams or {}, device)
    return (everything * s.trainable + largest * s.largest_tensor) * weight_width


def peak_phase(candidates: list[Linear], calibration: Calibration) -> Linear:
    """The phase that holds the most under ``calibration`` (autocast's cache included)."""
    return max(candidates, key=lambda phase: phase.value(calibration) + phase.cache)


def settle(parts: DevicePeak, candidates: list[Linear], calibration: Calibration, extra: float = 0.0) -> DevicePeak:
    """``parts`` completed with the phase that holds the most: its transient (plus ``extra``), its autocast cache
    and logits, and the device's overhead."""
    phase = peak_phase(candidates, calibration)
    return dataclasses.replace(parts, transient=round(phase.value(calibration) + extra),
                               overhead=calibration.overhead_bytes, autocast_cache=round(phase.cache),
                               logits=round(phase.logits))


def estimate(model: str, optimizer: str, workload: str, dtype: str = "float32", *, gpus: int = 1,
             device: str = "cuda", precision: str | None = None, calibration: Calibration | None = None,
             capacity_bytes: int | None = None, hparams: dict[str, Any] | None = None,
             checkpointing: bool = False, tuning: str = "full", strategy: str | None = None) -> Estimate:
    """Predicted peak bytes per device of one step of ``optimizer`` on ``model`` and ``workload``.

    ``hparams`` are the optimizer's (``state_dtype``, ``implementation``, ``block_size`` change the prediction);
    ``checkpointing``: the decoder layers recompute their activations in backward. ``tuning``: what is trained
    (``lora``/``prefix``: the adapters or the prefix, on one device). ``gpus`` devices (ranks, on CPU) share the
    model as ``strategy`` says (:data:`zomem.strategies.STRATEGIES`); by default first-order methods are sharded by
    FSDP, forward-only ones placed layer by layer by accelerate (``pipeline``; sharded on CPU).
    ``capacity_bytes`` (per GPU) bounds accelerate's placement of a forward-only method over several GPUs;
    without it the layers are balanced evenly.
    """
    if gpus < 1:
        raise UsageError(f"need at least one GPU, got --gpus {gpus}")
    kind = device_kind(device)
    if strategy is not None:  # what a measured cell could run (a prediction goes beyond: FSDP with any optimizer)
        strategies.check(strategy, gpus, optimizer, kind, tuning)
    strategy = strategy or default_strategy(optimizer, gpus, kind)
    calibration = calibration or Calibration.load(kind)
    prec = resolve_precision(optimizer, dtype, precision)
    work = workloads.get(workload)
    work.check_fits(models.spec(model).positions)
    hparams = dict(hparams or {})
    optim.check(optimizer, models.dtype("float32" if prec == "mixed" else dtype), hparams)
    check_checkpointing(optimizer, checkpointing, tuning)
    if tuning != "full" and gpus > 1:
        raise UsageError(f"--tuning {tuning} is estimated on one device only; several GPUs shard full fine-tuning")
    if tuning not in models.TUNINGS:
        raise UsageError(f"unknown tuning {tuning!r}. Valid: {', '.join(models.TUNINGS)}")
    cell = _Cell(model, optimizer, work, dtype, prec, kind, hparams, calibration.matmul_shadow.get(dtype, 0.0),
                 checkpointing, tuning)
    base = dict(model=model, optimizer=optimizer, workload=workload, dtype=dtype, precision=prec, device=kind,
                gpus=gpus, calibrated=calibration.calibrated, hparams=hparams, checkpointing=checkpointing,
                tuning=tuning)
    offloaded: list[str] = []
    if strategy is None:
        devices, how = [cell.single(calibration)], "single device"
        tensors = [cell.single(calibration.tensors_only())]
    elif strategy == "fsdp":
        devices, how = cell.fsdp(gpus, calibration), "FSDP full shard"
        tensors = cell.fsdp(gpus, calibration.tensors_only())
    elif strategy == "replicate":
        devices, how = [cell.single(calibration, gpus)] * gpus, "replicated, batch split"
        tensors = [cell.single(calibration.tensors_only(), gpus)]
    else:
        devices, offloaded = cell.accelerate(gpus, calibration, capacity_bytes)
        tensors, _ = cell.accelerate(gpus, calibration.tensors_only(), capacity_bytes)
        how = "accelerate device map"
    return Estimate(**base, devices=devices, placement=how, offloaded=offloaded,
                    tensor_bytes=max(d.total for d in tensors) if kind == "cuda" else None)


def default_strategy(optimizer: str, gpus: int, kind: str) -> str | None:
    """How ``gpus`` devices share a model when no strategy is named: one device alone; FSDP for first-order methods
    and for CPU ranks; accelerate's layer placement (the MeZO code's) for forward-only methods on GPUs."""
    if gpus == 1:
        return None
    return "pipeline" if kind == "cuda" and optim.forward_only(optim.get(optimizer)) else "fsdp"


def decompose(model: str, optimizer: str, workload: str, dtype: str, precision: str, device: str,
              hparams: dict[str, Any] | None = None, shadow: float = 0.0,
              checkpointing: bool = False, tuning: str = "full") -> tuple[DevicePeak, list[Linear], float]:
    """One device's persistent parts (transient and overhead 0), each phase's transient, uncalibrated, with a
    matmul ``shadow`` (:attr:`Calibration.matmul_shadow`), and the traced bytes an optimizer's own ``scale``
    multiplies: what :mod:`zomem.calibrate` fits the multipliers to."""
    prec = resolve_precision(optimizer, dtype, precision)
    cell = _Cell(model, optimizer, workloads.get(workload), dtype, prec, device_kind(device), hparams or {}, shadow,
                 checkpointing, tuning)
    return (*cell.decompose(), cell.raw())


@dataclass(frozen=True)
class _Cell:
    """One prediction's inputs, with each phase's transient and the per-device arithmetic of each placement."""

    model: str
    optimizer: str
    work: workloads.Workload
    dtype: str
    precision: Precision
    kind: str
    hparams: dict[str, Any]
    #: bytes per output element a matmul holds in float32 while it runs (:attr:`Calibration.matmul_shadow`)
    shadow: float = 0.0
    checkpointing: bool = False
    tuning: str = "full"

    @property
    def backprop(self) -> bool:
        return not optim.forward_only(optim.get(self.optimizer))

    @property
    def fused(self) -> bool:
        """Whether the optimizer updates inside backward, freeing each gradient as it is made."""
        return optim.fused_backward(optim.get(self.optimizer))

    @property
    def shape(self) -> Shape:
        return shape(self.model, self.tuning)

    @property
    def per_param(self) -> Persistent:
        return persistent_per_param(self.optimizer, self.dtype, self.precision, self.hparams, self.model, self.tuning)

    def trace(self, batch_size: int | None = None) -> Trace:
        work = self.work if batch_size is None else dataclasses.replace(self.work, batch_size=batch_size)
        return trace(self.model, work, self.dtype, self.precision, self.backprop, self.checkpointing, self.fused,
                     self.tuning)

    def logits(self, batch_size: int | None = None) -> int:
        return workloads.logits_bytes(self.work, models.spec(self.model).vocab, models.dtype(self.dtype), batch_size)

    def head_shadow(self, batch_size: int | None = None) -> float:
        """The float32 buffer the head's matmul fills first, where the machine's matmul computes into one."""
        return self.logits(batch_size) / models.dtype(self.dtype).itemsize * self.shadow

    def buffers(self) -> tuple[float, float]:
        """A zeroth-order walk's block buffers alive during the forwards and during the update pass."""
        block = block_bytes(self.optimizer, self.shape, self.dtype, self.precision, self.kind, self.hparams)
        cls = optim.get(self.optimizer)
        return getattr(cls, "forward_buffers", 0) * block, getattr(cls, "update_buffers", 0) * block

    def scaler(self) -> int:
        return SCALER_BYTES if self.precision == "mixed" and self.dtype == "float16" and self.backprop else 0

    def phases(self, gradients: float, *, step: float = 0.0, layers: bool = True, head: bool = True,
               batch_size: int | None = None, shards: int = 1) -> list[Linear]:
        """Each phase's transient beyond weights, state, the ``gradients`` counted as a part, and autocast's cache.
        With ``shards`` > 1 (FSDP) each device keeps that share of the gradients made so far, the rest being
        reduce-scattered away as each layer's backward ends."""
        t, logits, shadow = self.trace(batch_size), self.logits(batch_size), self.head_shadow(batch_size)
        if self.backprop:
            # the forward and the start of the backward, every layer's activations saved (and as the head's matmul
            # runs, its float32 buffer where the machine has one); then the optimizer step, the gradients made
            forward, start = t.moments[0], t.moments[1]
            phases = [Linear(m.gradients / shards - gradients, activations=m.other, cache=m.casts, logits=logits)
                      for m in (forward, start)]
            phases.append(Linear(shadow - gradients, activations=t.at_head.other + logits, cache=forward.casts,
                                 logits=logits))
            # the layers' backward: a checkpointed layer recomputes its activations beside the gradients made so far,
            # and where gradients are freed as they are made, a tied embedding's two gradients meet at the end
            rest = t.moments[2]
            phases.append(Linear(rest.gradients / shards - gradients, activations=rest.other, cache=rest.casts))
            return [*phases, Linear(step)]
        during, after = self.buffers()
        casts = t.peak.casts if (layers or head) else 0
        working = max(t.layer_peak if layers else 0, t.head_peak if head else 0) - casts
        phases = [Linear(during, forward=max(working, 0), cache=casts, logits=logits if head else 0)]
        if head and shadow:
            # the head's matmul makes its output and, first, a float32 buffer of it
            phases.append(Linear(during + shadow, forward=t.at_head.other + logits, cache=casts, logits=logits))
        return [*phases, Linear(after)]

    def raw(self, *, layers: bool = True, head: bool = True, batch_size: int | None = None) -> float:
        """The traced bytes an optimizer's own ``scale`` multiplies: a forward's peak, or what backward begins
        with (a JVP's dual activations, say, grow with them)."""
        t = self.trace(batch_size)
        if self.backprop:
            return t.moments[1].other
        return max(max(t.layer_peak if layers else 0, t.head_peak if head else 0) - t.peak.casts, 0)

    def extras(self, calibration: Calibration, weight_bytes: float, *, layers: bool = True, head: bool = True,
               batch_size: int | None = None) -> float:
        """What this optimizer's cells show beyond the shared constants: ``scale`` times more of :meth:`raw`,
        ``copies`` of the weights the device holds, and ``bytes`` of its own (the libraries of a package it wraps),
        and what the tuning mode's cells show beyond a full one's."""
        extra = calibration.optimizers.get(self.optimizer, {})
        return (extra.get("scale", 0.0) * self.raw(layers=layers, head=head, batch_size=batch_size)
                + extra.get("copies", 0.0) * weight_bytes + extra.get("bytes", 0.0)
                + calibration.tunings.get(self.tuning, 0.0))

    def decompose(self, batch_size: int | None = None) -> tuple[DevicePeak, list[Linear]]:
        """One device's persistent parts (no transient, no overhead) and each phase's transient."""
        s, p = self.shape, self.per_param
        parts = DevicePeak(weights=round(s.params * p.weights),
                           optimizer_state=round(s.trainable * p.state) + self.scaler(),
                           gradients=round(s.trainable * p.gradients), transient=0, overhead=0)
        step = step_temporary(self.optimizer, s, p.weights, self.hparams, self.kind)
        return parts, self.phases(parts.gradients, step=step, batch_size=batch_size)

    def single(self, calibration: Calibration, replicas: int = 1) -> DevicePeak:
        """One device holding the whole model; one of ``replicas`` that split the batch between them."""
        batch = math.ceil(self.work.batch_size / replicas) if replicas > 1 else None
        parts, candidates = self.decompose(batch)
        trained = self.shape.trainable * self.per_param.weights  # what an optimizer's copies are copies of
        return settle(parts, candidates, calibration, self.extras(calibration, trained, batch_size=batch))

    def accelerate(self, gpus: int, calibration: Calibration,
                   capacity: int | None) -> tuple[list[DevicePeak], list[str]]:
        s, p = self.shape, self.per_param
        # state and per-weight extras live with their weights
        per_weight = 1 + p.state / p.weights + calibration.optimizers.get(self.optimizer, {}).get("copies", 0.0)

        def device(on: float, *, layers: bool, head: bool) -> DevicePeak:
            parts = DevicePeak(weights=round(on * p.weights), optimizer_state=round(on * p.state), gradients=0,
                               transient=0, overhead=0)
            return settle(parts, self.phases(0, layers=layers, head=head), calibration,
                          self.extras(calibration, parts.weights, layers=layers, head=head))

        if capacity is None:
            budgets = (s.params * p.weights * 2,) * gpus  # room for everything: get_balanced_memory then splits evenly
        else:
            # Room for the weights once the overhead, the transient and the state of each device are set aside;
            # device 0 also holds the tied embedding / LM head, so the logits are computed there.
            reserve = [device(0, layers=True, head=i == 0).total for i in range(gpus)]
            budgets = tuple(max(int((capacity - r) / per_weight), 0) for r in reserve)
        placed = placement.place(self.model, "float32" if self.precision == "mixed" else self.dtype, gpus, budgets)
        devices = [device(on, layers=i in placed.layer_devices, head=i == placed.head) if on
                   else DevicePeak(0, 0, 0, 0, calibration.overhead_bytes) for i, on in enumerate(placed.params)]
        return devices, placed.offloaded

    def fsdp(self, gpus: int, calibration: Calibration) -> list[DevicePeak]:
        # Full sharding (ZeRO-3), one FSDP unit per decoder layer plus the root unit (embeddings, final norm):
        # each GPU keeps 1/N of the weights, gradients and state; during compute the root unit and two layer
        # units (the current one and the prefetched next) are gathered whole, with (backprop) one layer's full
        # gradients before its reduce-scatter; a forward-only step's head runs with the root alone gathered (its
        # layers resharded). Data parallel: each GPU runs ceil(batch/N) examples.
        s, p = self.shape, self.per_param
        batch = math.ceil(self.work.batch_size / gpus)
        weights, gradients = s.params * p.weights / gpus, s.params * p.gradients / gpus
        # In mixed precision FSDP gathers half copies and reduce-scatters half gradients (accelerate's MixedPrecision
        # policy in the autocast dtype, as Trainer's --fp16/--bf16 set it with FSDP), keeping float32 shards.
        mixed = self.precision == "mixed"
        unit = models.dtype(self.dtype).itemsize if mixed else p.weights
        held = calibration.fsdp
        shards = held.get("root_shards" if self.backprop else "forward_root_shards", 0.0)
        layers = (s.root_params * shards / gpus + 2 * s.layer_params) * unit
        parts = DevicePeak(weights=round(weights), optimizer_state=round(s.params * p.state / gpus) + self.scaler(),
                           gradients=round(gradients), transient=0, overhead=0)
        if self.backprop:
            layers += held.get("gradient_units", 1.0) * (s.root_params + s.layer_params) * (
                unit if mixed else p.gradients)
            candidates = [dataclasses.replace(c, constant=c.constant + layers) for c in self.phases(
                parts.gradients, batch_size=batch, shards=gpus,
                step=step_temporary(self.optimizer, s, p.weights, self.hparams, self.kind) / gpus)]
        else:
            candidates = [*(dataclasses.replace(c, constant=c.constant + layers)
                            for c in self.phases(0, head=False, batch_size=batch)),
                          *self.phases(0, layers=False, batch_size=batch)]
        # gathered in the autocast dtype already, the weights leave autocast nothing to cast and cache
        candidates = [dataclasses.replace(c, cache=0.0) for c in candidates]
        extra = s.root_params * unit + self.extras(calibration, weights, batch_size=batch)
        return [settle(parts, candidates, calibration, extra)] * gpus
