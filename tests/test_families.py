"""The families people fine-tune now, and any causal LM a local config describes: exact parameter counts, every
optimizer and tuning mode on each family's tiny model, and configs zomem cannot build refused up front."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from zomem import models, optim, workloads
from zomem.cell import Cell
from zomem.cli import main as cli
from zomem.errors import UsageError
from zomem.measure import Phases, make_closure

#: the published architectures' parameter counts (tied weights once), from their configs
PUBLISHED = {
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496, "llama-3.1-405b": 405_853_388_800, "mistral-7b": 7_248_023_552,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664, "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
}
TINY = ("llama-tiny", "mistral-tiny", "qwen2.5-tiny")
#: a GPT-NeoX config of the kind a user would point --model at (an architecture outside the registry)
NEOX = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 256, "vocab_size": 1024, "max_position_embeddings": 512,
        "rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False}


@pytest.mark.parametrize(("name", "count"), list(PUBLISHED.items()))
def test_every_published_model_builds_on_meta_with_its_exact_parameter_count(name: str, count: int) -> None:
    assert models.param_count(models.build_meta(name)) == count == models.spec(name).params


def test_every_other_registered_model_states_the_count_it_builds() -> None:
    for name in set(models.MODELS.names()) - set(PUBLISHED):
        spec = models.spec(name)
        assert spec.params is None or models.param_count(models.build_meta(spec)) == spec.params, name


@pytest.mark.parametrize("tuning", models.TUNINGS)
@pytest.mark.parametrize("model", TINY)
def test_each_family_runs_every_optimizer_in_every_tuning_mode(model: str, tuning: str) -> None:
    # one model per family and mode, a fresh copy for each optimizer: what a cell builds, without building it again
    Cell(model, "mezo", "sst2", tuning=tuning, device="cpu").validated()
    # peft draws the adapters and the prefix from torch's generator: seeded as a cell seeds it, so that ZO-SGD-Cons's
    # choice, which may keep θ where neither move lowers the loss, is the same at every run
    torch.manual_seed(0)
    built = models.apply_tuning(models.build(model), tuning)
    workload = workloads.get("sst2")
    batch = workloads.make_batch(workload, built.config.vocab_size)
    for name in optim.OPTIMIZERS.names():
        module = copy.deepcopy(built)
        optimizer = optim.create(name, optim.decay_groups(module.named_parameters()), config=module.config)
        closure, _ = make_closure(module, optimizer, workload, batch, Phases())
        trained = [p for p in module.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trained]
        loss = optimizer.step(closure)
        assert torch.isfinite(torch.as_tensor(loss)), (model, tuning, name)
        if name != "inference":
            assert any(not torch.equal(p, b) for p, b in zip(trained, before, strict=True)), (model, tuning, name)


def test_lora_targets_each_familys_own_query_and_value_projections() -> None:
    for model in ("opt-tiny", *TINY):
        wrapped = models.apply_tuning(models.build_meta(model), "lora")
        adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in wrapped.named_parameters()
                   if ".lora_A" in name}
        assert adapted == {"q_proj", "v_proj"}, model


def test_a_sequence_longer_than_a_models_positions_is_refused() -> None:
    with pytest.raises(UsageError, match="only 2048 positions"):
        Cell("opt-tiny", "mezo", "long4096").validated()
    assert Cell("llama-tiny", "mezo", "long4096", device="cpu").validated().model == "llama-tiny"


@pytest.fixture
def neox(tmp_path: Path) -> Path:
    path = tmp_path / "neox" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(NEOX))
    return path


def test_a_local_config_outside_the_registry_runs_estimates_and_fits(neox: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    spec = models.spec(str(neox.parent))  # the folder, or the file itself
    assert spec.family == "local" and spec.model_type == "gpt_neox"
    out = tmp_path / "r.jsonl"
    assert cli(["run", "--model", str(neox), "--optimizer", "mezo", "--workload", "sst2", "--device", "cpu",
                "--steps", "1", "--out", str(out)]) == 0
    assert "ok" in capsys.readouterr().out
    assert cli(["estimate", "--model", str(neox), "--optimizer", "mezo", "--workload", "sst2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] > 0
    assert cli(["fit", "--models", str(neox), "--optimizer", "mezo", "--hardware", "1xA100-80GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["answer"] == str(neox)


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 64}, "no causal-LM head"),
    ({"model_type": "not-a-model"}, "is not one transformers knows"),
])
def test_a_config_zomem_cannot_build_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            config: dict[str, object], message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert cli(["run", "--model", str(path), "--optimizer", "mezo", "--workload", "sst2", "--device", "cpu",
                "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_list_groups_the_models_by_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    assert "| llama-3  | llama-3.1-8b" in out and "8,030,261,248" in out and "| qwen2.5  |" in out
