"""The estimator: exact persistent parts, transient terms, several GPUs, calibration and its CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import torch

from zomem import calibrate, estimate, models, records, workloads
from zomem.cli import main as cli
from zomem.errors import UsageError
from zomem.estimate import Calibration, tracing
from zomem.hardware import GIB
from zomem.optim.base import CPU_BLOCK, CUDA_BLOCK
from zomem.records import Record

#: every multiplier 1 and no overhead: predictions are the bare analytic counts
BARE = Calibration("cuda", False, 0)


def params(model: str) -> int:
    return models.param_count(models.build_meta(model))


@pytest.mark.parametrize(("optimizer", "dtype", "precision", "hparams", "per_param"), [
    # bytes per parameter of (weights, optimizer state, gradients)
    ("mezo", "float16", "pure", {}, (2, 0, 0)),
    ("zo-adam", "float16", "pure", {}, (2, 4, 0)),
    ("zo-adam", "float32", "pure", {"state_dtype": "bfloat16"}, (4, 4, 0)),
    ("hizoo", "float32", "pure", {}, (4, 4, 0)),
    ("hizoo", "bfloat16", "pure", {"state_dtype": "float32"}, (2, 4, 0)),
    ("adam", "float32", "pure", {}, (4, 8, 4)),
    ("adam", "bfloat16", "mixed", {}, (4, 8, 4)),  # float32 weights, gradients and moments: 16 bytes as ever
    ("sgd", "bfloat16", "mixed", {}, (4, 0, 4)),
    ("mezo", "bfloat16", "mixed", {}, (4, 0, 0)),
])
def test_persistent_parts_are_exact(optimizer: str, dtype: str, precision: str, hparams: dict[str, str],
                                    per_param: tuple[int, ...]) -> None:
    e = estimate.estimate("opt-125m", optimizer, "sst2", dtype, precision=precision, calibration=BARE,
                          hparams=hparams)
    assert e.precision == precision
    n = params("opt-125m")
    d = e.devices[0]
    assert (d.weights, d.optimizer_state, d.gradients) == tuple(n * b for b in per_param)
    assert d.overhead == 0 and e.peak_bytes == d.total


def test_a_float16_gradient_scaler_keeps_three_scalars() -> None:
    e = estimate.estimate("opt-125m", "adam", "sst2", "float16", calibration=BARE)
    assert e.precision == "mixed" and e.worst.optimizer_state == 8 * params("opt-125m") + estimate.SCALER_BYTES


def test_mixed_precision_counts_autocasts_copy_of_every_matmul_weight() -> None:
    meta = models.build_meta("opt-125m")
    read_by_matmuls = {id(p): p.numel() for m in meta.modules() if isinstance(m, torch.nn.Linear)
                       for p in m.parameters()}
    mixed = estimate.estimate("opt-125m", "mezo", "sst2", "bfloat16", precision="mixed", calibration=BARE).worst
    # traced: a bfloat16 copy of every weight and bias a matmul reads (the tied head among them), each once
    assert mixed.autocast_cache == 2 * sum(read_by_matmuls.values())
    assert estimate.estimate("opt-125m", "mezo", "sst2", "bfloat16", calibration=BARE).worst.autocast_cache == 0


def test_state_dtype_changes_the_answer() -> None:
    half, wide = (estimate.estimate("opt-125m", "hizoo", "sst2", "bfloat16", device="cpu",
                                    hparams={"state_dtype": d}).peak_bytes for d in ("float16", "float32"))
    assert wide - half == pytest.approx(2 * params("opt-125m"), rel=0.01)


def test_adam_implementations_differ_by_their_update_temporaries() -> None:
    s = estimate.shape("opt-125m")
    peaks = {i: estimate.estimate("opt-125m", "adam", "sst2", "float32", calibration=BARE,
                                  hparams={"implementation": i}).worst for i in ("fused", "foreach", "for-loop")}
    # at opt-125m sst2 backprop's start outweighs the gradients and a for-loop's two temporaries; foreach's copy
    # of every second moment outweighs it
    assert peaks["for-loop"].total == peaks["fused"].total
    assert peaks["foreach"].transient == 4 * s.params
    assert peaks["foreach"].total > peaks["fused"].total
    with pytest.raises(UsageError, match="implementation"):
        estimate.estimate("opt-125m", "adam", "sst2", hparams={"implementation": "triton"})


def test_a_gpu_estimate_predicts_nvml_and_torch_allocated() -> None:
    e = estimate.estimate("opt-1.3b", "mezo", "multirc", "float16")
    assert set(e.peaks) == {"nvml", "torch_allocated"}
    calibration = Calibration.load("cuda")
    assert e.peaks["nvml"] - e.peaks["torch_allocated"] >= calibration.overhead_bytes
    assert set(estimate.estimate("opt-125m", "mezo", "sst2", device="cpu").peaks) == {"cpu_hwm"}


def test_half_precision_first_order_is_mixed_and_mixed_needs_a_half_dtype() -> None:
    assert estimate.resolve_precision("adam", "float16") == "mixed"
    assert estimate.resolve_precision("mezo", "float16") == "pure"
    assert estimate.resolve_precision("adam", "float32") == "pure"
    with pytest.raises(UsageError, match="half dtype"):
        estimate.resolve_precision("adam", "float32", "mixed")


def test_the_tracker_follows_known_allocations() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        weight = torch.empty(8, 4)
        x = torch.empty(16, 4)
        tracker = tracing._Tracker({tracing._key(weight), tracing._key(x)}, {tracing._key(weight)})
        with tracker:
            out = x @ weight.T  # 16 × 8 float32: 512 bytes, alive
            act = torch.relu(out)  # 512 more while out is alive
            del out
            half = weight.to(torch.bfloat16)  # a cast of a weight: 64 bytes
            del act
    timeline = tracker.timeline(set())
    assert max(m.total for m in timeline) == 1024
    assert timeline[-1] == estimate.Moment(other=0, casts=64)
    del mode, half


def test_a_trace_extrapolates_the_depth_exactly() -> None:
    spec, squad = models.spec("opt-125m"), workloads.get("squad")
    full = tracing._trace_once(spec, spec.layers, squad, "float32", "pure", True)
    assert estimate.trace("opt-125m", squad, "float32", "pure", True) == full


def test_forward_only_transient_is_the_traced_working_set_and_names_the_logits() -> None:
    squad = workloads.get("squad")
    t = estimate.trace("opt-125m", squad, "float32", "pure", False)
    logits = squad.sequences * squad.seq_len * models.spec("opt-125m").vocab * 4
    assert t.head_peak > logits > t.layer_peak  # the loss's float32 copies beside the logits
    e = estimate.estimate("opt-125m", "inference", "squad", "float32", calibration=BARE).worst
    assert e.transient == t.head_peak and e.logits == logits
    # a wide model with a short sequence: one layer's working set outweighs the logits
    wide = estimate.trace("opt-175b", workloads.get("multirc"), "float16", "pure", False)
    assert wide.layer_peak > wide.head_peak


def test_a_large_vocabulary_makes_the_logits_the_largest_transient_share() -> None:
    e = estimate.estimate("llama-3.2-1b", "mezo", "squad", "bfloat16", calibration=BARE).worst
    squad = workloads.get("squad")
    assert e.logits == squad.sequences * squad.seq_len * 128256 * 2 and e.logits > e.transient / 2


def test_backprop_keeps_every_layer_and_costs_more_than_a_forward() -> None:
    fo = estimate.estimate("opt-125m", "mezo", "squad", "float32", calibration=BARE).worst
    bp = estimate.estimate("opt-125m", "sgd", "squad", "float32", calibration=BARE).worst
    assert bp.transient > fo.transient
    start = estimate.trace("opt-125m", workloads.get("squad"), "float32", "pure", True).moments[1]
    assert bp.transient == start.total - bp.gradients
    # one example of a large model: the gradients outweigh what backward frees, so the peak is at its end, where the
    # tied embedding's two gradients (the head's, kept since backward began, and the lookup's) are summed
    big = estimate.estimate("opt-13b", "sgd", "multirc", "float16", precision="pure", calibration=BARE).worst
    end = estimate.trace("opt-13b", workloads.get("multirc"), "float16", "pure", True).moments[2]
    embedding = estimate.shape("opt-13b").largest_tensor * 2
    assert big.transient == end.total - big.gradients >= 2 * embedding and big.gradients == big.weights


def test_zeroth_order_buffers_are_blocks_in_float32() -> None:
    s = estimate.shape("opt-1.3b")
    assert s.largest_tensor > CUDA_BLOCK
    # z is drawn in float32 whatever the weights' dtype, one bounded block at a time on every device
    assert estimate.block_bytes("mezo", s, "float16", "pure", "cuda") == CUDA_BLOCK * 4
    assert estimate.block_bytes("mezo", s, "float32", "pure", "cpu") == CPU_BLOCK * 4
    assert estimate.block_bytes("mezo", s, "float32", "pure", "cuda", {"block_size": None}) == s.largest_tensor * 4
    assert estimate.block_bytes("adam", s, "float32", "pure", "cuda") == 0
    # HiZOO keeps √H beside z through its forwards
    working = estimate.trace("opt-1.3b", workloads.get("multirc"), "float16", "pure", False).peak.total
    mezo, hizoo = (estimate.estimate("opt-1.3b", o, "multirc", "float16", calibration=BARE).worst.transient
                   for o in ("mezo", "hizoo"))
    assert mezo == working + CUDA_BLOCK * 4 and hizoo == mezo + CUDA_BLOCK * 4


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


def test_fsdp_keeps_a_shard_of_the_gradients_made_and_gathers_half_units_in_mixed_precision() -> None:
    # each layer's gradients are reduce-scattered as its backward ends: a device never holds the others' 7/8
    one = estimate.estimate("llama-3.1-70b", "adam", "multirc", "float16", calibration=BARE).worst
    eight = estimate.estimate("llama-3.1-70b", "adam", "multirc", "float16", gpus=8, calibration=BARE).worst
    s = estimate.shape("llama-3.1-70b")
    gathered_half = (s.root_params + 2 * s.layer_params) * 2 + (s.root_params + s.layer_params) * 2
    assert gathered_half < eight.transient < gathered_half + 2 * GIB
    assert eight.autocast_cache == 0 and eight.transient < one.gradients / 8


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
    truth = Calibration("cpu", True, 350 * 2**20, 1.2, 0.8)
    fitted = calibrate.fit(_synthetic(truth), "cpu")
    assert fitted.calibrated and fitted.cells == 60
    assert fitted.overhead_bytes == pytest.approx(truth.overhead_bytes, rel=1e-3)
    for name in ("forward_scale", "activation_scale"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3)
    assert all(abs(v) < 1e-3 for extra in fitted.optimizers.values() for v in extra.values())
    assert fitted.worst_residual < 1e-3


def test_an_optimizer_with_more_transient_gets_its_own_extra() -> None:
    truth = Calibration("cpu", True, 350 * 2**20, 1.2, 0.8, optimizers={"zo-adam": {"copies": 0.5, "scale": 1.0}})
    fitted = calibrate.fit(_synthetic(truth), "cpu")
    shares = {k: v for k, v in fitted.optimizers["zo-adam"].items() if k != "bytes"}
    assert shares == pytest.approx({"copies": 0.5, "scale": 1.0}, abs=0.05)
    assert abs(fitted.optimizers["zo-adam"]["bytes"]) < 2**20
    assert max(abs(extra[k]) for o, extra in fitted.optimizers.items() if o != "zo-adam"
               for k in ("copies", "scale")) < 0.05
    assert fitted.worst_residual < 0.01


def test_an_optimizer_whose_package_loads_libraries_gets_its_own_bytes() -> None:
    # On CPU a wrapped package's libraries are in every peak of its cells, whatever the model's size.
    truth = Calibration("cpu", True, 350 * 2**20, 1.2, 0.8, optimizers={"sgd": {"bytes": 100 * 2**20}})
    fitted = calibrate.fit(_synthetic(truth), "cpu")
    assert fitted.optimizers["sgd"]["bytes"] == pytest.approx(100 * 2**20, rel=0.05)
    assert fitted.overhead_bytes == pytest.approx(truth.overhead_bytes, rel=0.01)
    assert max(abs(extra["bytes"]) for k, extra in fitted.optimizers.items() if k != "sgd") < 2**20
    assert fitted.worst_residual < 0.01


def test_a_tuned_model_keeps_state_and_gradients_of_its_adapters_only() -> None:
    full = estimate.estimate("opt-125m", "adam", "sst2", "float32", device="cpu", calibration=BARE).worst
    lora = estimate.estimate("opt-125m", "adam", "sst2", "float32", device="cpu", calibration=BARE, tuning="lora")
    trained = 294_912  # LoRA r=8 on the query and value projections of opt-125m's 12 layers
    assert lora.tuning == "lora"
    assert lora.worst.weights == (params("opt-125m") + trained) * 4
    assert lora.worst.optimizer_state == 2 * trained * 4 and lora.worst.gradients == trained * 4
    # the frozen layers still keep what the adapters' gradients need, but not the weights' own
    assert 0 < lora.worst.transient < full.transient + full.gradients
    with pytest.raises(UsageError, match="one device"):
        estimate.estimate("opt-1.3b", "adam", "sst2", "float16", gpus=2, tuning="lora")


def test_each_tuning_mode_gets_the_bytes_its_cells_show_beyond_a_full_one() -> None:
    # on CPU peft's libraries are loaded before the floor is read, so they are in every tuned cell's peak
    truth = Calibration("cpu", True, 350 * 2**20, 1.2, 0.8, tunings={"lora": 90 * 2**20})
    tuned = []
    for model in ("opt-tiny", "opt-mini"):
        for optimizer in ("mezo", "adam"):
            w = workloads.get("sst2")
            r = Record(model, optimizer, "sst2", "lora", "float32", "cpu", w.batch_size, w.seq_len,
                       env={"cpu": "test CPU"})
            tuned.append(dataclasses.replace(r, peak_bytes={"cpu_hwm": calibrate.predict(r, truth).peak_bytes}))
    fitted = calibrate.fit(_synthetic(truth) + tuned, "cpu")
    assert fitted.tunings["lora"] == pytest.approx(90 * 2**20, rel=0.01)
    assert fitted.overhead_bytes == pytest.approx(truth.overhead_bytes, rel=1e-3)  # full cells alone set it
    assert fitted.cells == 64 and fitted.worst_residual < 1e-3


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
    assert set(data["devices"][0]) == {"weights", "optimizer_state", "gradients", "autocast_cache", "transient",
                                       "overhead", "logits", "total"}
    assert data["peak_bytes"] == data["devices"][0]["total"] == data["peaks"]["nvml"]
    assert 0 < data["peaks"]["torch_allocated"] < data["peaks"]["nvml"]
    assert cli(["estimate", "--model", "opt-125m", "--optimizer", "hizoo", "--workload", "sst2", "--device", "cpu",
                "--hparam", "state_dtype=float16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hparams"] == {"state_dtype": "float16"}
    assert cli(["estimate", "--model", "opt-13b", "--optimizer", "mezo", "--workload", "multirc", "--gpus", "2"]) == 0
    assert "cuda:1" in capsys.readouterr().out


REPORTS = Path(__file__).parent.parent / "reports"
#: the records the shipped CPU constants were fitted to
FITTED = estimate.CALIBRATION_DIR / "cpu.records.jsonl"


def test_the_shipped_cpu_constants_fit_their_own_records_within_5_percent() -> None:
    shipped = Calibration.load("cpu")
    fitted_to = records.read(FITTED)
    assert shipped.calibrated and shipped.cells == sum(calibrate.modelled(r, "cpu") for r in fitted_to)
    assert shipped.worst_residual is not None and shipped.worst_residual <= 0.05


@pytest.mark.parametrize("folder", ["cpu-default", "cpu-families/qwen2.5-pythia"])
def test_the_reference_and_held_out_family_cells_are_predicted_within_5_percent(folder: str) -> None:
    # qwen2.5 is the family held out of the CPU calibration: its cells are predicted, never fitted
    measured = [r for r in records.read(REPORTS / folder / "records.jsonl") if calibrate.modelled(r, "cpu")]
    fitted_to = records.read(FITTED)
    assert not any(r.model.startswith("qwen") for r in fitted_to)
    worst = max(calibrate.residuals(measured, Calibration.load("cpu")), key=lambda res: abs(res.relative))
    assert len(measured) >= 6 and abs(worst.relative) <= 0.05, (worst.record.key, worst.relative)
