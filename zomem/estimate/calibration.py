"""The constants that turn the estimator's tensor counts into the bytes a device kind's probe reports."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from zomem.errors import UsageError

DEVICE_KINDS = ("cpu", "cuda")
#: the probe whose peak the estimator predicts on each device kind: what decides an out-of-memory there
PROBE = {"cpu": "cpu_hwm", "cuda": "nvml"}
CALIBRATION_DIR = resources.files("zomem") / "calibration"


def device_kind(device: str) -> str:
    """``cpu`` or ``cuda`` for a device name such as ``cuda:1``."""
    kind = device.split(":")[0]
    if kind not in DEVICE_KINDS:
        raise UsageError(f"the estimator knows device kinds {', '.join(DEVICE_KINDS)}, not {device!r}")
    return kind


@dataclass(frozen=True)
class Calibration:
    """The constants that turn tensor counts into the bytes one device kind's probe reports."""

    device: str
    #: whether the constants were fitted to measured records (False: analytic defaults)
    calibrated: bool
    #: bytes a device holds before the model: the CUDA context, or the process floor on CPU
    overhead_bytes: int
    #: multipliers on the traced transients (allocator slack and what a trace leaves out): a forward-only step's,
    #: and backprop's
    forward_scale: float = 1.0
    activation_scale: float = 1.0
    #: optimizer name -> what its cells show beyond the shared constants: ``scale``, a fraction more of the
    #: analytic transient (e.g. a JVP's dual activations), ``copies`` of its weights (e.g. tangents), and ``bytes``
    #: that do not grow with the model (on CPU, the libraries of a package it wraps, loaded before the floor is read
    #: but in the process's peak)
    optimizers: dict[str, dict[str, float]] = field(default_factory=dict)
    #: tuning mode -> bytes its cells show beyond a fully tuned cell's prediction: on CPU, the libraries peft loads
    #: (before the floor is read, as a cell loads them)
    tunings: dict[str, float] = field(default_factory=dict)
    #: dtype -> bytes per output element that a matmul computing in that dtype holds in float32 while it runs:
    #: oneDNN computes bfloat16 matmuls into float32 on CPUs without native bfloat16; a GPU writes the output
    #: directly. Measured, not fitted (calibration carries it over).
    matmul_shadow: dict[str, float] = field(default_factory=dict)
    #: what FSDP holds beside its gathered units (the root, and while the layers run two decoder layers, whole) as
    #: this kind's ranks showed it: ``root_shards`` and ``forward_root_shards``, copies of a rank's shard of the root
    #: unit alive beside them in backprop's step and while a forward-only step's layers run (analytic: none);
    #: ``gradient_units``, the gathered units' whole gradients alive at backprop's peak (analytic: one). Measured on
    #: several ranks, not fitted (calibration carries it over).
    fsdp: dict[str, float] = field(default_factory=dict)
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

    def tensors_only(self) -> Calibration:
        """No overhead and every shared multiplier 1 (each optimizer's own extras kept, but not the bytes of the
        libraries it loads): the bytes live tensors hold, which ``torch_allocated`` reports, without the context
        and the allocator's slack."""
        optimizers = {name: {**extra, "bytes": 0.0} for name, extra in self.optimizers.items()}
        return dataclasses.replace(self, overhead_bytes=0, forward_scale=1.0, activation_scale=1.0,
                                   optimizers=optimizers, tunings={})

    def to_json(self) -> str:
        """Pretty JSON, the form stored with the package."""
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the calibration as JSON."""
        Path(path).write_text(self.to_json())
