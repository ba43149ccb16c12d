"""LoRA and prefix tuning through peft: what is trained, what the record says, and that every kind of optimizer runs."""

from __future__ import annotations

import pytest
import torch

from zomem import models
from zomem.cell import Cell
from zomem.measure import measure, prepare

SPEC = models.spec("opt-tiny")
#: r·(in + out) for q_proj and v_proj in every layer; 5 virtual tokens of keys and values in every layer
TRAINABLE = {
    "lora": SPEC.layers * 2 * models.LORA_SETTINGS["r"] * 2 * SPEC.hidden,
    "prefix": models.PREFIX_TOKENS * SPEC.layers * 2 * SPEC.hidden,
}
STATE_COPIES = {"mezo": 0, "zo-adamu": 1, "adamezo": 0, "hizoo": 1, "adam": 2}


@pytest.mark.parametrize("tuning", ["lora", "prefix"])
@pytest.mark.parametrize("optimizer", list(STATE_COPIES))
def test_peft_modes_run_and_record_what_was_tuned(tuning: str, optimizer: str) -> None:
    record = measure(Cell(model="opt-tiny", optimizer=optimizer, workload="sst2", tuning=tuning, device="cpu",
                          steps=1, warmup=1))
    assert record.status == "ok" and record.tuning == tuning
    assert record.trainable_params == TRAINABLE[tuning]
    assert record.params > record.trainable_params
    assert record.breakdown["trainable"] == 4 * TRAINABLE[tuning]
    assert record.breakdown["optimizer_state"] == pytest.approx(
        STATE_COPIES[optimizer] * record.breakdown["trainable"], rel=0.02)


@pytest.mark.parametrize("tuning", ["lora", "prefix"])
def test_only_the_adapters_move(tuning: str) -> None:
    prepared = prepare(Cell(model="opt-tiny", optimizer="mezo", workload="sst2", tuning=tuning, device="cpu",
                            hparams={"lr": 1e-2}))
    before = {name: p.detach().clone() for name, p in prepared.model.named_parameters()}
    prepared.step()
    for name, param in prepared.model.named_parameters():
        assert torch.equal(param, before[name]) != param.requires_grad, name


def test_adapters_take_the_model_dtype() -> None:
    for tuning in ("lora", "prefix"):
        model = models.apply_tuning(models.build("opt-tiny", torch_dtype=torch.bfloat16), tuning)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert not model.training
