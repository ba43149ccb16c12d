"""The first-order methods that save memory, as the harness and the estimator see them: updates inside backward
(LOMO, AdaLomo), wrapped packages (GaLore, 8-bit AdamW, Adam-mini) and gradient checkpointing."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from zomem import estimate, fit, hardware, measure, models, optim, records, sweep, tables, workloads
from zomem.closure import Phases, make_closure
from zomem.cell import Cell
from zomem.cli import main as cli
from zomem.errors import UsageError
from zomem.estimate import Calibration

#: predictions on the bare constants: no overhead, unit multipliers, no optimizer's extras
BARE = Calibration("cpu", False, 0)


def tiny_step(name: str, **hparams: object) -> tuple[torch.nn.Module, optim.Optimizer]:
    """One step of ``name`` on opt-tiny / sst2, through the harness's closure."""
    model = models.build("opt-tiny")
    workload = workloads.get("sst2")
    batch = workloads.make_batch(workload, model.config.vocab_size)
    optimizer = optim.create(name, optim.decay_groups(model.named_parameters()), config=model.config, **hparams)
    closure, _ = make_closure(model, optimizer, workload, batch, Phases())
    optimizer.step(closure)
    return model, optimizer


# --- updates inside backward ---


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_an_update_in_backward_leaves_no_gradient_and_counts_the_largest(name: str) -> None:
    model, optimizer = tiny_step(name)
    assert all(p.grad is None for p in model.parameters())
    # the tied embedding / head is the largest tensor: its gradient is the largest alive at once
    assert optimizer.largest_gradient == max(p.nbytes for p in model.parameters())


def test_lomo_record_counts_the_largest_gradient_not_a_copy_of_the_weights() -> None:
    record = measure.measure(Cell("opt-tiny", "lomo", "sst2", device="cpu", steps=1, warmup=1))
    largest = max(p.nbytes for p in models.build_meta("opt-tiny").parameters())  # opt-tiny's position embedding
    assert record.breakdown["gradients"] == largest < record.breakdown["trainable"] / 2


def test_hooks_read_the_groups_a_resumed_optimizer_has() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = optim.LOMO([param], lr=0.1)
    saved = optimizer.state_dict()
    saved["param_groups"][0]["lr"] = 0.5
    optimizer.load_state_dict(saved)
    optimizer.step(lambda: param.sum().backward())
    torch.testing.assert_close(param.detach(), torch.full((3,), 0.5))


def test_an_update_in_backward_is_refused_under_a_float16_gradient_scaler() -> None:
    with pytest.raises(UsageError, match="gradient scaler"):
        Cell("opt-tiny", "lomo", "sst2", dtype="float16", precision="mixed", device="cpu").validated()
    Cell("opt-tiny", "lomo", "sst2", dtype="bfloat16", precision="mixed", device="cpu").validated()
    # what the largest-fit table predicts (float16, mixed precision) is still predicted
    assert fit.predict(hardware.parse_row("1xA100-80GB"), "lomo").answer is not None


def test_the_estimator_frees_each_gradient_in_a_fused_backward() -> None:
    work = workloads.get("multirc")
    plain = estimate.trace("opt-tiny", work, "float32", "pure", True)
    fused = estimate.trace("opt-tiny", work, "float32", "pure", True, fused=True)
    assert plain.moments[2].gradients > 0 and fused.moments[2].gradients == 0
    per_param = estimate.persistent_per_param("lomo", "float32", "pure")
    assert per_param.gradients == 0 and estimate.persistent_per_param("sgd", "float32", "pure").gradients == 4
    lomo = estimate.estimate("opt-125m", "lomo", "multirc", "float32", device="cpu", calibration=BARE)
    sgd = estimate.estimate("opt-125m", "sgd", "multirc", "float32", device="cpu", calibration=BARE)
    assert sgd.peak_bytes - lomo.peak_bytes > 0.6 * sgd.worst.gradients


# --- wrapped packages ---


def test_galore_keeps_its_projectors_and_rank_and_resumes_from_a_weights_only_load() -> None:
    model, optimizer = tiny_step("galore", rank=8)
    assert optimizer.defaults["rank"] == 8
    projected = [optimizer.state[p] for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2]
    assert projected and all(8 in s["projector"].ortho_matrix.shape and 8 in s["exp_avg"].shape for s in projected)
    # the projectors are counted, and nothing twice
    tensors = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert optim.state_bytes(optimizer) == (sum(t.nbytes for t in tensors)
                                            + sum(s["projector"].ortho_matrix.nbytes for s in projected))
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    optimizer.load_state_dict(torch.load(saved))  # weights_only: the projectors are plain dicts in the file
    assert all(type(s["projector"]).__name__ == "GaLoreProjector" for s in projected)


def test_adamw_8bit_says_which_package_ran() -> None:
    _, optimizer = tiny_step("adamw-8bit")
    assert optimizer.defaults["backend"] == "bitsandbytes"
    assert optim.state_dtype(optimizer) == torch.uint8


def test_adamw_8bit_falls_back_to_torchao_where_bitsandbytes_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    params = [torch.nn.Parameter(torch.zeros(8, device="meta"))]
    if importlib.util.find_spec("torchao") is None:  # the optional extra zomem[torchao]
        with pytest.raises(optim.PackageUnavailable, match="bitsandbytes package.*nor can its fallback.*torchao"):
            optim.create("adamw-8bit", params)
        return
    assert optim.create("adamw-8bit", params).defaults["backend"] == "torchao"


def test_the_estimator_counts_8bit_moments_in_bytes_and_galore_by_name() -> None:
    # two bytes a parameter (and the blocks' scales) whatever the weights' dtype
    for dtype in ("float32", "bfloat16"):
        assert estimate.persistent_per_param("adamw-8bit", dtype, "pure").state == 2 * (1 + 4 / 256)
    low = estimate.persistent_per_param("galore", "float32", "pure", {"rank": 8}, "opt-125m").state
    high = estimate.persistent_per_param("galore", "float32", "pure", {}, "opt-125m").state
    assert low < high < 2 * 4  # rank 128 (the default) keeps more, and less than AdamW's two moments


def test_adam_mini_splits_by_name_and_needs_the_config_for_heads() -> None:
    model, optimizer = tiny_step("adam-mini")
    names = {g["name"] for g in optimizer.param_groups}
    # OPT's final_layer_norm is a vector the package would take for an output layer: its own block instead
    assert not any("final_layer_norm.weight" in n for n in names)
    assert any("q_proj.weight" in n for n in names)
    q = next(g for g in optimizer.param_groups if g["name"].endswith("layers.0.self_attn.q_proj.weight"))
    assert optimizer.state[q["params"][0]]["vmean"].numel() == model.config.num_attention_heads
    with pytest.raises(UsageError, match="needs the model's config"):
        optim.create("adam-mini", optim.decay_groups(model.named_parameters()))


def test_adam_mini_keeps_adams_second_moment_for_embeddings_unless_told_per_token() -> None:
    for embeddings, per_element in (("adam", True), ("token", False)):
        model, optimizer = tiny_step("adam-mini", embeddings=embeddings)
        embedding = model.get_input_embeddings().weight
        v = optimizer.state[embedding].get("v", optimizer.state[embedding].get("vmean"))
        assert v.numel() == (embedding.numel() if per_element else embedding.shape[0]), embeddings
        assert optimizer.defaults["embeddings"] == embeddings
    with pytest.raises(ValueError, match="invalid embeddings: 'row'"):
        tiny_step("adam-mini", embeddings="row")


@pytest.mark.parametrize("embeddings", ["adam", "token"])
def test_adam_mini_on_named_blocks_takes_the_papers_steps_in_float64(embeddings: str) -> None:
    # block -> (shape, rows its second moments average over: the embedding per element or per token, the MLP per
    # output neuron, the query per head of hidden 4 / 2 heads = 8 elements, the norm whole)
    blocks = {"model.embed_tokens.weight": (6, 4), "model.layers.0.mlp.fc1.weight": (5, 4),
              "model.layers.0.self_attn.q_proj.weight": (4, 4), "model.norm.weight": (4,)}
    rows = {"model.embed_tokens.weight": (-1, 1) if embeddings == "adam" else (6, 4),
            "model.layers.0.mlp.fc1.weight": (5, 4), "model.layers.0.self_attn.q_proj.weight": (2, 8),
            "model.norm.weight": (1, 4)}
    lr, (b1, b2), eps, decay = 0.05, (0.8, 0.9), 1e-8, 0.1
    generator = torch.Generator().manual_seed(0)
    start = {name: torch.randn(shape, dtype=torch.float64, generator=generator) for name, shape in blocks.items()}
    params = {name: torch.nn.Parameter(t.clone()) for name, t in start.items()}
    config = types.SimpleNamespace(hidden_size=4, num_attention_heads=2)
    optimizer = optim.create("adam-mini", list(params.items()), lr=lr, betas=(b1, b2), eps=eps, weight_decay=decay,
                             embeddings=embeddings, config=config)
    want, m, v = dict(start), {n: torch.zeros(s, dtype=torch.float64) for n, s in blocks.items()}, {}
    for t in range(1, 4):
        optimizer.zero_grad()
        sum((torch.sin(3 * p) + p**2).sum() for p in params.values()).backward()
        optimizer.step()
        for name, theta in want.items():
            g = 3 * torch.cos(3 * theta) + 2 * theta
            m[name] = b1 * m[name] + (1 - b1) * g
            v[name] = b2 * v.get(name, 0.0) + (1 - b2) * (g**2).reshape(rows[name]).mean(dim=1, keepdim=True)
            h = v[name].sqrt() / math.sqrt(1 - b2**t) + eps
            theta = theta * (1 - lr * (0.0 if "norm" in name else decay))
            want[name] = theta - (lr / (1 - b1**t) * m[name].reshape(rows[name]) / h).reshape(theta.shape)
    for name, param in params.items():
        torch.testing.assert_close(param.detach(), want[name], rtol=1e-12, atol=1e-12, msg=name)


def test_the_estimator_counts_adam_minis_state_as_the_package_keeps_it() -> None:
    # opt-125m: Adam's m everywhere, and Adam's v for the embeddings (31% of the parameters) and the biases
    state = estimate.persistent_per_param("adam-mini", "float32", "pure", {}, "opt-125m").state / 4
    assert state == pytest.approx(1.32, abs=0.01)
    token = estimate.persistent_per_param("adam-mini", "float32", "pure", {"embeddings": "token"}, "opt-125m").state
    assert token / 4 == pytest.approx(1.0, abs=0.01)


def test_a_package_that_cannot_load_makes_an_error_record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "galore_torch", None)
    cell = Cell("opt-tiny", "galore", "sst2", device="cpu", steps=1).validated()  # validation lets it through
    cell_path, result_path = tmp_path / "cell.json", tmp_path / "record.json"
    cell_path.write_text(cell.to_json())
    assert measure.main(str(cell_path), str(result_path)) == 0
    record = records.Record.from_dict(json.loads(result_path.read_text()))
    assert record.status == "error" and "galore-torch package, which cannot be loaded here" in record.error


# --- gradient checkpointing ---


def test_checkpointing_is_for_backprop_and_not_for_prefix_tuning() -> None:
    with pytest.raises(UsageError, match="runs no backward"):
        Cell("opt-tiny", "mezo", "sst2", device="cpu", checkpointing=True).validated()
    with pytest.raises(UsageError, match="prefix"):
        Cell("opt-tiny", "adam", "sst2", tuning="prefix", device="cpu", checkpointing=True).validated()
    cells = sweep.plan(["opt-tiny"], ["mezo", "adam"], ["sst2"], sweep.Settings("cpu", checkpointing=True))
    assert [c.checkpointing for c in cells] == [False, True]


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_checkpointing_gives_the_same_gradients(tuning: str) -> None:
    workload = workloads.get("sst2")
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)  # peft draws LoRA's A from torch's generator
        model = models.apply_tuning(models.build("opt-tiny"), tuning)
        if checkpointed:
            models.enable_checkpointing(model)
        batch = workloads.make_batch(workload, model.config.vocab_size)
        workloads.loss(model, workload, batch).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed)


def test_a_checkpointed_record_is_its_own_cell() -> None:
    record = measure.measure(Cell("opt-tiny", "adam", "sst2", device="cpu", steps=1, warmup=0, checkpointing=True))
    assert record.checkpointing and record.method == "adam + checkpointing"
    assert record.key[1] == "adam + checkpointing"
    cell = Cell("opt-tiny", "adam", "sst2", device="cpu", steps=1, warmup=0)
    assert not sweep.matches(record, cell) and sweep.matches(record, dataclasses.replace(cell, checkpointing=True))
    assert records.Record.from_dict(json.loads(record.to_json())).checkpointing


def test_the_estimator_traces_a_checkpointed_backward() -> None:
    plain = estimate.estimate("opt-125m", "adam", "squad", "float32", device="cpu", calibration=BARE)
    checkpointed = estimate.estimate("opt-125m", "adam", "squad", "float32", device="cpu", calibration=BARE,
                                     checkpointing=True)
    assert checkpointed.checkpointing and checkpointed.peak_bytes < plain.peak_bytes - (1 << 30)
    assert checkpointed.worst.weights == plain.worst.weights


def test_largest_fit_shows_a_checkpointed_column(capsys: pytest.CaptureFixture[str]) -> None:
    row = hardware.parse_row("1xA100-80GB")
    plain = fit.predict(row, "adam")
    checkpointed = fit.predict(row, "adam", checkpointing=True)
    assert checkpointed.method == "adam + checkpointing"
    ladder = list(fit.DEFAULT_LADDER)
    assert ladder.index(checkpointed.answer) >= ladder.index(plain.answer)
    table = tables.largest_fit([plain, checkpointed], [row.name], ["adam", "adam + checkpointing"])
    assert table.headers == ["hardware", "adam", "adam + checkpointing"]
    assert all(cell.endswith("(p)") for cell in table.rows[0][1:])
    assert cli(["fit", "--optimizer", "adam", "--checkpointing", "--hardware", "1xA100-80GB"]) == 0
    assert "adam + checkpointing" in capsys.readouterr().out
