"""The estimator: predicted peak bytes per device for a cell, measured or not.

peak = per-device overhead + weights + optimizer state + gradients + transient, where the transient is
one layer's working set or the logits and loss, whichever is larger (forward-only methods), or every
layer's saved activations plus the logits and their gradient (backprop). The tensor counts are read
off OPT's forward (transformers, sdpa attention); the multipliers that turn them into bytes a probe
sees come from a calibration per device kind (``zomem/calibration/<kind>.json``, written by
``zomem calibrate``). Several GPUs: forward-only methods are placed layer by layer by accelerate on the
meta model; first-order methods are sharded as FSDP shards them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from zomem import models, optim, workloads
from zomem.errors import UsageError
from zomem.optim.base import CPU_BLOCK

Precision = Literal["pure", "mixed"]
PRECISIONS: tuple[Precision, ...] = ("pure", "mixed")
DEVICE_KINDS = ("cpu", "cuda")
#: the probe whose peak the estimator predicts on each device kind: what decides an out-of-memory there
PROBE = {"cpu": "cpu_hwm", "cuda": "nvml"}
CALIBRATION_DIR = resources.files("zomem") / "calibration"

#: tensors of T×H elements alive at once in a decoder layer under no_grad, at its peak (ReLU): the layer input
#: (the caller holds it), the residual sum, fc1's output and ReLU's output (4H each). Counted with a dispatch
#: mode on opt-125m and opt-350m layers.
LAYER_WORKING_SET = 10
#: tensors of T×H elements autograd saves per decoder layer: both LayerNorm inputs, the q/k/v input, q, k, v
#: and the attention output (sdpa saves them; out_proj's input is a view of the output), fc1's input and
#: ReLU's output (4H, shared with fc2). Counted with saved-tensor hooks on opt-125m: 12.2, the rest being
#: LayerNorm statistics and the attention's log-sum-exp.
SAVED_PER_LAYER = 12
#: float32 copies of the target positions' logits that the loss holds at once beside the logits: the
#: log_softmax output and nll_loss's contiguous copy of it, plus the float copy of half-precision logits
LOSS_COPIES = {4: 2, 2: 3}
#: accelerate must not split a decoder layer across devices (it has a residual connection)
NO_SPLIT = ["OPTDecoderLayer"]
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Calibration:
    """The constants that turn tensor counts into the bytes one device kind's probe reports."""

    device: str
    #: whether the constants were fitted to measured records (False: analytic defaults)
    calibrated: bool
    #: bytes a device holds before the model: the CUDA context, or the process floor on CPU
    overhead_bytes: int
    #: multipliers on the analytic transient terms (allocator slack and what the count leaves out)
    forward_scale: float = 1.0
    activation_scale: float = 1.0
    logits_scale: float = 1.0
    #: optimizer name -> what its cells show beyond the shared constants: ``scale``, a fraction more of the
    #: analytic transient (e.g. a JVP's dual activations), and ``copies`` of its weights (e.g. tangents)
    optimizers: dict[str, dict[str, float]] = field(default_factory=dict)
    #: where the constants come from, and how well they fit
    source: str = ""
    worst_residual: float | None = None
    cells: int = 0

    @classmethod
    def load(cls, device: str, path: str | Path | None = None) -> Calibration:
        """The calibration stored with the package for ``device`` (``cpu``/``cuda``), or the one at ``path``."""
        kind = device_kind(device)
        text = Path(path).read_text() if path else (CALIBRATION_DIR / f"{kind}.json").read_text()
        return cls(**json.loads(text))

    def to_json(self) -> str:
        """Pretty JSON, the form stored with the package."""
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the calibration as JSON."""
        Path(path).write_text(self.to_json())


def device_kind(device: str) -> str:
    """``cpu`` or ``cuda`` for a device name such as ``cuda:1``."""
    kind = device.split(":")[0]
    if kind not in DEVICE_KINDS:
        raise UsageError(f"the estimator knows device kinds {', '.join(DEVICE_KINDS)}, not {device!r}")
    return kind


@dataclass
class DevicePeak:
    """The predicted peak of one device, by part."""

    weights: int
    optimizer_state: int
    gradients: int
    transient: int
    overhead: int

    @property
    def total(self) -> int:
        """The predicted peak bytes of this device."""
        return self.weights + self.optimizer_state + self.gradients + self.transient + self.overhead


@dataclass
class Estimate:
    """A predicted peak: per device, with the worst device's figure as :attr:`peak_bytes`."""

    model: str
    optimizer: str
    workload: str
    dtype: str
    precision: Precision
    device: str
    gpus: int
    calibrated: bool
    devices: list[DevicePeak]
    #: how the model is spread: "single device", "accelerate device map" or "FSDP full shard"
    placement: str
    #: modules accelerate could not place on the GPUs (offloaded to cpu or disk): the model does not fit
    offloaded: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        """Predicted peak bytes on the most loaded device."""
        return max(d.total for d in self.devices)

    @property
    def worst(self) -> DevicePeak:
        """The most loaded device's breakdown."""
        return max(self.devices, key=lambda d: d.total)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the per-device breakdowns and the worst device's peak."""
        data = dataclasses.asdict(self)
        data["peak_bytes"] = self.peak_bytes
        for device, peak in zip(data["devices"], self.devices, strict=True):
            device["total"] = peak.total
        return data


@dataclass(frozen=True)
class Shape:
    """What the estimator needs to know about a model: counted once on the meta device."""

    spec: models.ModelSpec
    params: int
    #: parameters of one decoder layer, and of everything outside the layers (embeddings, final norm)
    layer_params: int
    root_params: int
    largest_tensor: int


@functools.cache
def meta_model(model: str) -> torch.nn.Module:
    """The model on the meta device (cached: placement asks for it repeatedly; dtypes are priced separately)."""
    return models.build_meta(model)


@functools.cache
def shape(model: str) -> Shape:
    """Parameter counts of ``model``, tied weights counted once."""
    meta = meta_model(model)
    layers = meta.model.decoder.layers
    layer_params = models.param_count(layers[0])
    params = models.param_count(meta)
    return Shape(models.spec(model), params, layer_params, params - layer_params * len(layers),
                 max(p.numel() for p in meta.parameters()))


def resolve_precision(optimizer: str, dtype: str, precision: str | None = None) -> Precision:
    """``mixed`` for first-order methods in a half dtype (fp32 master weights and moments), else ``pure``."""
    half = dtype in ("float16", "bfloat16")
    if precision is None:
        return "mixed" if half and not optim.forward_only(optim.get(optimizer)) else "pure"
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}. Valid: {', '.join(PRECISIONS)}")
    if precision == "mixed" and not half:
        raise UsageError(f"mixed precision keeps half-precision weights; {dtype} is not a half dtype (use float16)")
    return precision  # type: ignore[return-value]


@dataclass(frozen=True)
class Terms:
    """The bytes of one device's transient parts, before calibration multipliers."""

    #: one decoder layer under no_grad
    layer_working_set: int
    #: the logits of every position (OPT computes them all), in the model's dtype
    logits: int
    #: the loss's temporaries beside the logits (generation and multiple choice; classification reads two words)
    loss: int
    #: every decoder layer's saved activations
    activations: int
    #: the tied embedding / LM head's gradient: the first gradient backward makes, while the logits' is alive
    head_gradient: int


def terms(model: str, workload: workloads.Workload, dtype: str, batch_size: int | None = None) -> Terms:
    """Analytic transient terms for one forward (and backward) of ``workload`` on ``model``.

    ``batch_size`` overrides the workload's batch (a data-parallel shard holds only its part).
    """
    spec = models.spec(model)
    width = models.dtype(dtype).itemsize
    sequences = (batch_size or workload.batch_size) * workload.candidates
    tokens = sequences * workload.seq_len
    loss = 0
    if workload.loss != "classification":
        loss = LOSS_COPIES[width] * sequences * workload.targets * spec.vocab * FLOAT32_BYTES
    return Terms(
        layer_working_set=LAYER_WORKING_SET * tokens * spec.hidden * width,
        logits=tokens * spec.vocab * width,
        loss=loss,
        activations=SAVED_PER_LAYER * spec.layers * tokens * spec.hidden * width,
        head_gradient=spec.vocab * (spec.embed_dim or spec.hidden) * width,
    )


def working_set(t: Terms, *, layers: bool = True, head: bool = True) -> int:
    """Forward-only, uncalibrated: the larger of one layer's working set and the logits plus loss (of those a
    device holds: its layers, and the LM head)."""
    return max(t.layer_working_set if layers else 0, t.logits + t.loss if head else 0)


def forward_peak(t: Terms, *, layers: bool = True, head: bool = True) -> int:
    """The forward pass's own peak, without the loss: what a method that carries more per activation (a JVP's
    tangents, say) multiplies."""
    return max(t.layer_working_set if layers else 0, t.logits if head else 0)


def backward_start(t: Terms) -> int:
    """Backprop, uncalibrated: what is alive besides the weights and state when backward begins: every layer's
    activations and the logits' gradient, with the loss's temporaries or the head's gradient, whichever is larger."""
    return t.activations + t.logits + max(t.loss, t.head_gradient)


def transient(t: Terms, calibration: Calibration, optimizer: str, weight_bytes: float, gradient_bytes: float = 0,
              *, backprop: bool, layers: bool = True, head: bool = True) -> float:
    """A device's calibrated transient beyond its weights, state and gradients, plus the optimizer's own extras
    (``scale`` times more of the forward pass's peak or of what backward begins with, ``copies`` of the weights
    the device holds).

    Backprop peaks either when backward begins or, once the gradients outweigh what backward frees, at its
    end with every gradient made; the transient is what the first exceeds the gradients by, if anything.
    """
    extra = calibration.optimizers.get(optimizer, {})
    if backprop:
        raw = backward_start(t)
        alive = (calibration.activation_scale * t.activations + calibration.logits_scale * t.logits
                 + max(t.loss, t.head_gradient))
        shared = max(alive - gradient_bytes, 0.0)
    else:
        raw = forward_peak(t, layers=layers, head=head)
        shared = calibration.forward_scale * working_set(t, layers=layers, head=head)
    return shared + extra.get("scale", 0.0) * raw + extra.get("copies", 0.0) * weight_bytes


def zo_buffer_bytes(optimizer: str, s: Shape, dtype: str, device: str) -> int:
    """A zeroth-order step's z buffer: one block (CPU) or the largest tensor (CUDA), in the parameter dtype."""
    if not issubclass(optim.get(optimizer), optim.ZerothOrder):
        return 0
    elements = min(s.largest_tensor, CPU_BLOCK) if device_kind(device) == "cpu" else s.largest_tensor
    return elements * models.dtype(dtype).itemsize


def persistent_per_param(optimizer: str, dtype: str, precision: Precision) -> tuple[float, float, float]:
    """Bytes per trainable parameter of weights, optimizer state and gradients.

    Mixed precision: half weights and gradients, a float32 master copy counted with the state, and the
    state (moments) in float32.
    """
    cls = optim.get(optimizer)
    width = models.dtype(dtype).itemsize
    copies = float(getattr(cls, "state_copies", 0.0))
    grads = 0.0 if optim.forward_only(cls) else width
    if precision == "mixed":
        return width, FLOAT32_BYTES * (1 + copies), grads
    return width, width * copies, grads


def estimate(model: str, optimizer: str, workload: str, dtype: str = "float32", *, gpus: int = 1,
             device: str = "cuda", precision: str | None = None, calibration: Calibration | None = None,
             capacity_bytes: int | None = None) -> Estimate:
    """Predicted peak bytes per device of one step of ``optimizer`` on ``model`` and ``workload``.

    ``capacity_bytes`` (per GPU) bounds accelerate's placement of a forward-only method over several GPUs;
    without it the layers are balanced evenly.
    """
    if gpus < 1:
        raise UsageError(f"need at least one GPU, got --gpus {gpus}")
    kind = device_kind(device)
    if kind == "cpu" and gpus != 1:
        raise UsageError("several devices are GPUs: use --device cuda with --gpus")
    calibration = calibration or Calibration.load(kind)
    prec = resolve_precision(optimizer, dtype, precision)
    work = workloads.get(workload)
    work.check_fits(models.spec(model).positions)
    forward_only = optim.forward_only(optim.get(optimizer))
    base = dict(model=model, optimizer=optimizer, workload=workload, dtype=dtype, precision=prec, device=kind,
                gpus=gpus, calibrated=calibration.calibrated)
    if gpus == 1:
        return Estimate(**base, devices=[_single(model, optimizer, work, dtype, prec, kind, calibration)],
                        placement="single device")
    if forward_only:
        devices, offloaded = _accelerate(model, optimizer, work, dtype, prec, gpus, calibration, capacity_bytes)
        return Estimate(**base, devices=devices, placement="accelerate device map", offloaded=offloaded)
    return Estimate(**base, devices=_fsdp(model, optimizer, work, dtype, prec, gpus, calibration),
                    placement="FSDP full shard")


def _single(model: str, optimizer: str, work: workloads.Workload, dtype: str, prec: Precision, kind: str,
            calibration: Calibration) -> DevicePeak:
    s = shape(model)
    w, st, g = persistent_per_param(optimizer, dtype, prec)
    t = terms(model, work, dtype)
    weight_bytes = s.params * w
    backprop = not optim.forward_only(optim.get(optimizer))
    zbuf = zo_buffer_bytes(optimizer, s, dtype, kind)
    part = transient(t, calibration, optimizer, weight_bytes, s.params * g, backprop=backprop) + zbuf
    return DevicePeak(weights=round(weight_bytes), optimizer_state=round(s.params * st),
                      gradients=round(s.params * g), transient=round(part), overhead=calibration.overhead_bytes)


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    # Placing for GPUs that are not in this machine is the point; accelerate warns about each one.
    # The NVML check keeps torch from initialising CUDA in this (parent) process.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=256)
def device_map(model: str, dtype: str, budgets: tuple[int, ...]) -> dict[str, int | str]:
    """accelerate's balanced device map of ``model`` over GPUs with these weight budgets (bytes)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    meta, torch_dtype = meta_model(model), models.dtype(dtype)
    with _quiet_accelerate():
        max_memory = get_balanced_memory(meta, dict(enumerate(budgets)), no_split_module_classes=NO_SPLIT,
                                         dtype=torch_dtype)
        return infer_auto_device_map(meta, max_memory, no_split_module_classes=NO_SPLIT, dtype=torch_dtype)


def _accelerate(model: str, optimizer: str, work: workloads.Workload, dtype: str, prec: Precision, gpus: int,
                calibration: Calibration, capacity: int | None) -> tuple[list[DevicePeak], list[str]]:
    s = shape(model)
    w, st, _ = persistent_per_param(optimizer, dtype, prec)
    # state and per-weight extras live with their weights
    per_weight = 1 + st / w + calibration.optimizers.get(optimizer, {}).get("copies", 0.0)
    t = terms(model, work, dtype)
    zbuf = zo_buffer_bytes(optimizer, s, dtype, "cuda")
    if capacity is None:
        budgets = (s.params * w * 2,) * gpus  # room for everything: get_balanced_memory then splits evenly
    else:
        # Room for the weights once the overhead, the transient and the state of each device are set aside;
        # device 0 also holds the tied embedding / LM head, so the logits are computed there.
        reserve = [transient(t, calibration, optimizer, 0, backprop=False, head=i == 0) + zbuf
                   + calibration.overhead_bytes for i in range(gpus)]
        budgets = tuple(max(int((capacity - r) / per_weight), 0) for r in reserve)
    placement = device_map(model, dtype, budgets)
    owner = _owner(placement)
    weights_on = [0] * gpus
    for name, param in meta_model(model).named_parameters():  # tied weights appear once
        where = owner(name)
        if isinstance(where, int):
            weights_on[where] += param.numel() * w
    layer_devices = {owner(f"model.decoder.layers.{i}") for i in range(s.spec.layers)}
    head = owner("lm_head")
    devices = []
    for i in range(gpus):
        holds = weights_on[i] > 0
        part = transient(t, calibration, optimizer, weights_on[i], backprop=False, layers=i in layer_devices,
                         head=i == head) + zbuf if holds else 0
        devices.append(DevicePeak(weights=round(weights_on[i]), optimizer_state=round(weights_on[i] * st / w),
                                  gradients=0, transient=round(part), overhead=calibration.overhead_bytes))
    return devices, [name for name, where in placement.items() if not isinstance(where, int)]


def _owner(placement: dict[str, int | str]) -> Callable[[str], int | str]:
    """A function from a parameter or module name to the device of its most specific placement key."""

    def owner(name: str) -> int | str:
        parts = name.split(".")
        for end in range(len(parts), -1, -1):
            key = ".".join(parts[:end])
            if key in placement:
                return placement[key]
        raise KeyError(f"accelerate's device map does not place {name!r}")

    return owner


def _fsdp(model: str, optimizer: str, work: workloads.Workload, dtype: str, prec: Precision, gpus: int,
          calibration: Calibration) -> list[DevicePeak]:
    # Full sharding (ZeRO-3), one FSDP unit per decoder layer plus the root unit (embeddings, final norm):
    # each GPU keeps 1/N of the weights, gradients and state; during compute the root unit and two layer
    # units (the current one and the prefetched next) are gathered whole, with one layer's full gradients
    # before its reduce-scatter. Data parallel: each GPU runs ceil(batch/N) examples.
    s = shape(model)
    w, st, g = persistent_per_param(optimizer, dtype, prec)
    t = terms(model, work, dtype, batch_size=math.ceil(work.batch_size / gpus))
    gathered = (s.root_params + 2 * s.layer_params) * w + (s.root_params + s.layer_params) * g
    part = transient(t, calibration, optimizer, s.params * w / gpus, s.params * g / gpus, backprop=True) + gathered
    peak = DevicePeak(weights=round(s.params * w / gpus), optimizer_state=round(s.params * st / gpus),
                      gradients=round(s.params * g / gpus), transient=round(part),
                      overhead=calibration.overhead_bytes)
    return [peak] * gpus
