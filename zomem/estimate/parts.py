"""What a prediction is made of: one device's parts, the estimate over every device, and the linear form of each
phase's transient that calibration fits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from zomem.estimate.calibration import PROBE, Calibration

Precision = Literal["pure", "mixed"]


@dataclass
class DevicePeak:
    """The predicted peak of one device, by part (the parts a record's breakdown has)."""

    weights: int
    optimizer_state: int
    gradients: int
    transient: int
    overhead: int
    #: autocast's half-precision copies of the weights, where the peak's phase holds them (mixed precision)
    autocast_cache: int = 0
    #: of the transient, the logits (the largest single tensor of a forward-only step with a large vocabulary)
    logits: int = 0

    @property
    def total(self) -> int:
        """The predicted peak bytes of this device."""
        return (self.weights + self.optimizer_state + self.gradients + self.autocast_cache + self.transient
                + self.overhead)


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
    #: how the model is spread: "single device", "accelerate device map", "FSDP full shard" or "replicated, batch
    #: split"
    placement: str
    #: modules accelerate could not place on the GPUs (offloaded to cpu or disk): the model does not fit
    offloaded: list[str] = field(default_factory=list)
    #: the hyper-parameters that shaped the prediction (state_dtype, implementation, block_size)
    hparams: dict[str, Any] = field(default_factory=dict)
    #: whether the decoder layers recompute their activations in backward (gradient checkpointing)
    checkpointing: bool = False
    #: what was trained: ``full``, or the ``lora`` adapters or ``prefix``
    tuning: str = "full"
    #: on a GPU, the peak per device of live tensors alone: what ``torch_allocated`` reports
    tensor_bytes: int | None = None

    @property
    def peak_bytes(self) -> int:
        """Predicted peak bytes on the most loaded device, as the device kind's primary probe sees it."""
        return max(d.total for d in self.devices)

    @property
    def worst(self) -> DevicePeak:
        """The most loaded device's breakdown."""
        return max(self.devices, key=lambda d: d.total)

    @property
    def peaks(self) -> dict[str, int]:
        """Predicted peak per probe: the primary one, and on a GPU ``torch_allocated`` too."""
        out = {PROBE[self.device]: self.peak_bytes}
        if self.tensor_bytes is not None:
            out["torch_allocated"] = self.tensor_bytes
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the per-device breakdowns, the worst device's peak and the peak per probe."""
        data = dataclasses.asdict(self)
        data["peak_bytes"] = self.peak_bytes
        data["peaks"] = self.peaks
        for device, peak in zip(data["devices"], self.devices, strict=True):
            device["total"] = peak.total
        return data


@dataclass(frozen=True)
class Linear:
    """One phase's transient beyond weights, state, gradients and autocast cache, as ``constant + forward_scale·
    forward + activation_scale·activations``: linear in the calibrated multipliers, the form :mod:`zomem.calibrate`
    fits. ``cache`` is autocast's cache alive in the phase, a part of its own."""

    constant: float = 0.0
    forward: float = 0.0
    activations: float = 0.0
    cache: float = 0.0
    #: of the transient, the logits alive in this phase
    logits: float = 0.0

    def value(self, calibration: Calibration) -> float:
        """The phase's transient under ``calibration``'s multipliers."""
        return (self.constant + calibration.forward_scale * self.forward
                + calibration.activation_scale * self.activations)


@dataclass(frozen=True)
class Persistent:
    """Bytes per trainable parameter of weights, optimizer state and gradients."""

    weights: float
    state: float
    gradients: float
