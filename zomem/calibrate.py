"""Fit the estimator's constants to measured records, and say how far its predictions fall from them.

The fit is a least-squares one on relative error: the per-device overhead and the three transient
multipliers are shared by every cell of a device kind; then each optimizer gets the extra transient
(a fraction more of its traced transient, copies of its trainable parameters, and bytes that do not grow with the
model) that its cells still show on average.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zomem import estimate, models, optim, workloads
from zomem.errors import UsageError
from zomem.estimate import Calibration
from zomem.records import Record


@dataclass(frozen=True)
class Residual:
    """One measured cell beside the estimator's prediction for it."""

    record: Record
    probe: str
    measured: int
    predicted: int

    @property
    def relative(self) -> float:
        """(predicted − measured) / measured: positive when the estimator over-predicts."""
        return (self.predicted - self.measured) / self.measured


def modelled(record: Record, kind: str) -> bool:
    """Whether the estimator models ``record``: an ok cell of this device kind."""
    if record.status != "ok" or record.device.split(":")[0] != kind:
        return False
    if estimate.PROBE[kind] not in record.peak_bytes:
        return False
    try:
        models.spec(record.model)  # a registered model, or a config file that is still there
        optim.get(record.optimizer)
        workloads.get(record.workload)
    except UsageError:
        return False
    return True


def predict(record: Record, calibration: Calibration) -> estimate.Estimate:
    """The estimator's prediction for the cell ``record`` measured, in its precision and with its hyper-parameters."""
    return estimate.estimate(record.model, record.optimizer, record.workload, record.dtype,
                             device=calibration.device, precision=record.precision, calibration=calibration,
                             hparams=estimate.shaping(record.hparams), checkpointing=record.checkpointing,
                             tuning=record.tuning, gpus=record.ranks, strategy=record.strategy)


def residuals(records: Sequence[Record], calibration: Calibration) -> list[Residual]:
    """Predicted against measured peak for every record the estimator models on this device kind."""
    probe = estimate.PROBE[calibration.device]
    return [Residual(r, probe, r.peak_bytes[probe], predict(r, calibration).peak_bytes)
            for r in records if modelled(r, calibration.device)]


def fit(records: Sequence[Record], device: str, source: str = "") -> Calibration:
    """Constants for ``device``'s kind fitted to its ok records; at least three fully tuned ones are needed.

    The shared constants are fitted to every fully tuned cell, then each optimizer's extras to what they leave;
    optimizers whose extras matter (forward-grad's tangents, say) are then set aside and the shared constants
    refitted to the typical ones, so that one unusual method does not bend the constants of all the others. Last,
    each tuning mode gets the bytes its cells show beyond that.
    """
    kind = estimate.device_kind(device)
    usable = [r for r in records if modelled(r, kind)]
    # cells of several ranks are predicted from these constants, not fitted to: FSDP's terms are measured apart
    full = [r for r in usable if r.tuning == "full" and r.strategy is None]
    if len(full) < 3:
        raise UsageError(f"calibrating {kind} needs at least 3 ok fully tuned records measured on {kind}; "
                         f"got {len(full)}")
    calibration = _with_extras(_fit_shared(full, kind), full)
    typical = [r for r in full if abs(_extra_bytes(r, calibration)) < TYPICAL * r.peak_bytes[estimate.PROBE[kind]]]
    if len(typical) >= 3:
        calibration = _with_extras(_fit_shared(typical, kind), full)
    calibration = _with_tunings(calibration, usable)
    worst = max(abs(r.relative) for r in residuals(usable, calibration))
    machine = usable[0].env.get("gpu") or usable[0].env.get("cpu") or "unknown machine"
    stamp = datetime.datetime.now(datetime.UTC).date().isoformat()
    note = f"fitted {stamp} to {len(usable)} cells measured on {machine}" + (f" ({source})" if source else "")
    return dataclasses.replace(calibration, source=note, worst_residual=round(worst, 4), cells=len(usable))


#: an optimizer whose own extras move a cell's prediction by more than this fraction is not typical
TYPICAL = 0.02
#: how strongly an optimizer's own (scale, copies, bytes) are pulled towards none: keeps them sane when its cells
#: cannot tell them apart (one model, one workload), too weak to matter when they can
RIDGE = 1e-3


def _fit_shared(cells: Sequence[Record], kind: str) -> Calibration:
    """Overhead and transient multipliers, linear in each: a peak is the persistent parts plus the transient of the
    phase that holds the most (by the traced bytes): a forward-only method's forwards (a multiple of the traced
    working set, and its walk's buffers) or its update; backprop's forward and backward start (a multiple of the
    traced activations), the rest of its backward or its optimizer step (no multiplier shows there). Which phase
    holds the most depends on the multipliers, so it is chosen under the analytic ones, then again under the fitted
    ones until the choice settles. A term no cell exercises keeps 1."""
    stored = Calibration.load(kind)
    shadow = stored.matmul_shadow
    decomposed = [(r, *estimate.decompose(r.model, r.optimizer, r.workload, r.dtype, r.precision, kind,
                                          estimate.shaping(r.hparams), shadow.get(r.dtype, 0.0), r.checkpointing,
                                          r.tuning))
                  for r in cells]
    calibration, chosen = Calibration(kind, False, 0), None
    for _ in range(PHASE_ROUNDS):
        phases = [estimate.peak_phase(candidates, calibration) for _, _, candidates, _ in decomposed]
        if phases == chosen:
            break
        chosen = phases
        rows, targets, weights = [], [], []
        for (r, parts, _, _), phase in zip(decomposed, phases, strict=True):
            measured = r.peak_bytes[estimate.PROBE[kind]]
            rows.append([1.0, phase.forward, phase.activations])
            targets.append(measured - parts.total - phase.constant - phase.cache)
            weights.append(1.0 / measured)  # relative error: small cells count as much as large ones
        x = torch.tensor(rows, dtype=torch.float64)
        coef = _nonnegative_lstsq(x, torch.tensor(targets, dtype=torch.float64),
                                  torch.tensor(weights, dtype=torch.float64))
        present = x.any(dim=0).tolist()
        scales = (float(coef[j]) if present[j] else 1.0 for j in range(1, 3))
        calibration = Calibration(kind, True, int(round(float(coef[0]))), *scales, matmul_shadow=shadow,
                                  fsdp=stored.fsdp)
    return calibration


#: how often the peak phases are chosen again under the multipliers just fitted, at most
PHASE_ROUNDS = 5


def _extra_bytes(record: Record, calibration: Calibration) -> int:
    shared = dataclasses.replace(calibration, optimizers={})
    return predict(record, calibration).peak_bytes - predict(record, shared).peak_bytes


def _with_extras(shared: Calibration, cells: Sequence[Record]) -> Calibration:
    """``shared`` with each optimizer's (scale, copies, bytes) fitted to what ``shared`` leaves in its cells."""
    optimizers = {}
    for name in dict.fromkeys(r.optimizer for r in cells):
        rows, targets, weights = [], [], []
        for res in residuals([r for r in cells if r.optimizer == name], shared):
            r = res.record
            *_, raw = estimate.decompose(r.model, r.optimizer, r.workload, r.dtype, r.precision, shared.device,
                                         estimate.shaping(r.hparams), shared.matmul_shadow.get(r.dtype, 0.0),
                                         r.checkpointing, r.tuning)
            rows.append([raw, predict(r, shared).worst.weights, 1.0])
            targets.append(res.measured - res.predicted)
            weights.append(1.0 / res.measured)
        xw = torch.tensor(rows, dtype=torch.float64) * torch.tensor(weights, dtype=torch.float64)[:, None]
        yw = torch.tensor(targets, dtype=torch.float64) * torch.tensor(weights, dtype=torch.float64)
        scale = xw.abs().amax(dim=0).clamp(min=1e-30)  # unit columns, so one ridge suits both
        xs = xw / scale
        coef = torch.linalg.solve(xs.T @ xs + RIDGE * len(yw) * torch.eye(3, dtype=torch.float64), xs.T @ yw) / scale
        optimizers[name] = {"scale": round(float(coef[0]), 4), "copies": round(float(coef[1]), 4),
                            "bytes": round(float(coef[2]))}
    return dataclasses.replace(shared, optimizers=optimizers)


def _with_tunings(calibration: Calibration, cells: Sequence[Record]) -> Calibration:
    """``calibration`` with each tuning mode's bytes: what it leaves unpredicted in that mode's cells, the least
    squares of relative error (as everywhere in the fit: small cells count as much as large ones)."""
    tunings = {}
    for mode in dict.fromkeys(r.tuning for r in cells if r.tuning != "full"):
        left = residuals([r for r in cells if r.tuning == mode], calibration)
        weights = [res.measured ** -2 for res in left]
        tunings[mode] = round(sum(w * (res.measured - res.predicted) for w, res in zip(weights, left, strict=True))
                              / sum(weights))
    return dataclasses.replace(calibration, tunings=tunings)


def _nonnegative_lstsq(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Weighted least squares; a column whose coefficient comes out negative (a term these cells cannot
    # tell apart from the others) is dropped and the fit redone, so no constant turns a size negative.
    active = [j for j in range(x.shape[1]) if x[:, j].any()]
    while True:
        coef = torch.zeros(x.shape[1], dtype=x.dtype)
        coef[active] = torch.linalg.lstsq(x[:, active] * w[:, None], (y * w)[:, None]).solution[:, 0]
        negative = [j for j in active if coef[j] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda j: coef[j]))
