"""The estimator: exact persistent parts, transient terms, several GPUs, calibration and its CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from zomem import calibrate, estimate, models, records, workloads
from zomem.cli import main as cli
from zomem.errors import UsageError
from zomem.estimate import Calibration
from zomem.hardware import GIB
from zomem.records import Record

#: every multiplier 1 and no overhead: predictions are the bare analytic counts
BARE = Calibration("cuda", False, 0)


def params(model: str) -> int:
    return models.param_count(models.build_meta(model))


@pytest.mark.parametrize(("optimizer", "dtype", "precision", "per_param"), [
    # bytes per parameter of (weights, optimizer state, gradients)
    ("mezo", "float16", "pure", (2, 0, 0)),
    ("zo-adam", "float16", "pure", (2, 4, 0)),
    ("hizoo", "float32", "pure", (4, 4, 0)),
    ("adam", "float32", "pure", (4, 8, 4)),
    ("adam", "float16", "mixed", (2, 12, 2)),  # fp32 master weights and two fp32 moments
    ("sgd", "bfloat16", "mixed", (2, 4, 2)),
])
def test_persistent_parts_are_exact(optimizer: str, dtype: str, precision: str, per_param: tuple[int, ...]) -> None:
    e = estimate.estimate("opt-125m", optimizer, "sst2", dtype, calibration=BARE)
    assert e.precision == precision
    n = params("opt-125m")
    d = e.devices[0]
    assert (d.weights, d.optimizer_state, d.gradients) == tuple(n * b for b in per_param)
    assert d.overhead == 0 and e.peak_bytes == d.total


def test_half_precision_first_order_is_mixed_and_mixed_needs_a_half_dtype() -> None:
    assert estimate.resolve_precision("adam", "float16") == "mixed"
    assert estimate.resolve_precision("mezo", "float16") == "pure"
    assert estimate.resolve_precision("adam", "float32") == "pure"
    with pytest.raises(UsageError, match="half dtype"):
        estimate.resolve_precision("adam", "float32", "mixed")


def test_forward_only_transient_is_one_layer_or_the_logits_and_loss() -> None:
    spec = models.spec("opt-125m")
    squad = workloads.get("squad")
    t = estimate.terms("opt-125m", squad, "float32")
    tokens = squad.sequences * squad.seq_len
    assert t.logits == tokens * spec.vocab * 4
    # log_softmax's output and nll_loss's contiguous copy of it; float32 logits need no float copy
    assert t.loss == 2 * squad.sequences * squad.targets * spec.vocab * 4
    assert t.layer_working_set == estimate.LAYER_WORKING_SET * tokens * spec.hidden * 4
    assert t.activations == estimate.SAVED_PER_LAYER * spec.layers * tokens * spec.hidden * 4
    e = estimate.estimate("opt-125m", "inference", "squad", "float32", calibration=BARE)
    assert e.devices[0].transient == max(t.layer_working_set, t.logits + t.loss)
    # a wide model with a short sequence: one layer's working set outweighs the logits
    wide = estimate.terms("opt-175b", workloads.get("multirc"), "float16")
    assert wide.layer_working_set > wide.logits


def test_backprop_keeps_every_layer_and_costs_more_than_a_forward() -> None:
    fo = estimate.estimate("opt-125m", "mezo", "squad", "float32", calibration=BARE).worst
    bp = estimate.estimate("opt-125m", "sgd", "squad", "float32", calibration=BARE).worst
    assert bp.transient > fo.transient
    t = estimate.terms("opt-125m", workloads.get("squad"), "float32")
    assert bp.transient == t.activations + t.logits + max(t.loss, t.head_gradient) - bp.gradients
    # one example of a large model: the gradients outweigh what backward frees, so the peak is at its end
    big = estimate.estimate("opt-13b", "sgd", "multirc", "float16", precision="pure", calibration=BARE).worst
    assert big.transient == 0 and big.gradients == big.weights


def test_zeroth_order_buffer_is_one_block_on_cpu_and_the_largest_tensor_on_cuda() -> None:
    s = estimate.shape("opt-125m")
    assert estimate.zo_buffer_bytes("mezo", s, "float32", "cuda") == s.largest_tensor * 4
    assert estimate.zo_buffer_bytes("mezo", s, "float32", "cpu") == min(s.largest_tensor, 1 << 20) * 4
    assert estimate.zo_buffer_bytes("adam", s, "float32", "cuda") == 0


def test_accelerate_places_forward_only_methods_over_several_gpus() -> None:
    one = estimate.estimate("opt-13b", "mezo", "multirc", "float16", calibration=BARE)
    four = estimate.estimate("opt-13b", "mezo", "multirc", "float16", gpus=4, calibration=BARE)
    assert four.placement == "accelerate device map" and not four.offloaded
    assert sum(d.weights for d in four.devices) == one.devices[0].weights  # tied embedding counted once
    assert four.peak_bytes < one.peak_bytes / 2
    # the logits are computed where the tied embedding / LM head sits: device 0
    assert four.devices[0].transient == max(d.transient for d in four.devices)


def test_a_model_too_large_for_the_cards_is_offloaded_so_it_does_not_fit() -> None:
    e = estimate.estimate("opt-66b", "mezo", "multirc", "float16", gpus=2, capacity_bytes=32 * GIB)
    assert e.offloaded


def test_first_order_methods_shard_as_fsdp() -> None:
    one = estimate.estimate("opt-6.7b", "adam", "multirc", "float16", calibration=BARE).worst
    eight = estimate.estimate("opt-6.7b", "adam", "multirc", "float16", gpus=8, calibration=BARE)
    assert eight.placement == "FSDP full shard"
    d = eight.worst
    assert d.optimizer_state == pytest.approx(one.optimizer_state / 8, rel=1e-6)
    assert d.weights == pytest.approx(one.weights / 8, rel=1e-6)
    assert d.transient > one.transient  # the gathered root and layer units


def test_cuda_constants_are_marked_uncalibrated_and_cpu_ones_are_fitted() -> None:
    cuda = Calibration.load("cuda")
    assert not cuda.calibrated and "analytic" in cuda.source
    cpu = Calibration.load("cpu")
    assert cpu.calibrated and cpu.cells > 0 and cpu.worst_residual is not None
    assert not estimate.estimate("opt-125m", "mezo", "sst2").calibrated


def test_bad_input_is_refused() -> None:
    with pytest.raises(UsageError, match="device kinds"):
        estimate.estimate("opt-125m", "mezo", "sst2", device="tpu")
    with pytest.raises(UsageError, match="at least one GPU"):
        estimate.estimate("opt-125m", "mezo", "sst2", gpus=0)
    with pytest.raises(UsageError, match="positions"):
        estimate.estimate("opt-125m", "mezo", "custom:batch=1,seq=4096")


def _synthetic(calibration: Calibration) -> list[Record]:
    """Records whose peaks the estimator with ``calibration`` predicts exactly."""
    out = []
    for model in ("opt-tiny", "opt-mini", "opt-small", "opt-125m"):
        for optimizer in ("inference", "mezo", "zo-adam", "sgd", "adam"):
            for workload in ("sst2", "copa", "squad"):
                w = workloads.get(workload)
                r = Record(model, optimizer, workload, "full", "float32", "cpu", w.batch_size, w.seq_len,
                           trainable_params=params(model), env={"cpu": "test CPU"})
                peak = calibrate.predict(r, calibration).peak_bytes
                out.append(dataclasses.replace(r, peak_bytes={"cpu_hwm": peak}))
    return out


def test_calibration_recovers_known_constants() -> None:
    truth = Calibration("cpu", True, 350 * 2**20, 1.2, 0.8, 1.1)
    fitted = calibrate.fit(_synthetic(truth), "cpu")
    assert fitted.calibrated and fitted.cells == 60
    assert fitted.overhead_bytes == pytest.approx(truth.overhead_bytes, rel=1e-3)
    for name in ("forward_scale", "activation_scale", "logits_scale"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3)
    assert all(abs(v) < 1e-3 for extra in fitted.optimizers.values() for v in extra.values())
    assert fitted.worst_residual < 1e-3


def test_an_optimizer_with_more_transient_gets_its_own_extra() -> None:
    truth = Calibration("cpu", True, 350 * 2**20, 1.2, 0.8, 1.1, optimizers={"zo-adam": {"copies": 0.5, "scale": 1.0}})
    fitted = calibrate.fit(_synthetic(truth), "cpu")
    assert fitted.optimizers["zo-adam"] == pytest.approx({"copies": 0.5, "scale": 1.0}, abs=0.05)
    assert max(abs(v) for k, extra in fitted.optimizers.items() if k != "zo-adam" for v in extra.values()) < 0.05
    assert fitted.worst_residual < 0.01


def test_calibrate_and_estimate_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "records.jsonl"
    for record in _synthetic(Calibration("cpu", True, 300 * 2**20)):
        records.append(path, record)
    out = tmp_path / "cpu.json"
    assert cli(["calibrate", str(path), "--out", str(out)]) == 0
    assert "worst residual" in capsys.readouterr().out
    assert Calibration.load("cpu", out).overhead_bytes == pytest.approx(300 * 2**20, rel=1e-3)

    assert cli(["estimate", "--model", "opt-1.3b", "--optimizer", "adam", "--workload", "multirc", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["precision"] == "mixed" and data["calibrated"] is False
    assert set(data["devices"][0]) == {"weights", "optimizer_state", "gradients", "transient", "overhead", "total"}
    assert data["peak_bytes"] == data["devices"][0]["total"]
    assert cli(["estimate", "--model", "opt-13b", "--optimizer", "mezo", "--workload", "multirc", "--gpus", "2"]) == 0
    assert "cuda:1" in capsys.readouterr().out
