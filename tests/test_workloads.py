import pytest
import torch

from zomem import models, workloads
from zomem.errors import UnknownNameError, UsageError


@pytest.mark.parametrize("name", workloads.WORKLOADS.names())
def test_builtin_workloads_document_their_shape(name: str) -> None:
    workload = workloads.get(name)
    assert len(workload.provenance) > 40
    workload.check_fits(4096)  # the longest, long4096, is Llama 2's context


def test_shapes_from_the_spec() -> None:
    assert (workloads.get("multirc").batch_size, workloads.get("multirc").seq_len) == (1, 400)
    assert (workloads.get("long2048").batch_size, workloads.get("long2048").seq_len) == (1, 2048)
    assert workloads.get("copa").sequences == 32


def test_custom_workload() -> None:
    workload = workloads.get("custom:batch=8,seq=512")
    assert (workload.batch_size, workload.seq_len, workload.loss) == (8, 512, "generation")
    choice = workloads.get("custom:batch=2,seq=16,loss=multiple_choice,candidates=4,targets=3")
    assert choice.sequences == 8


@pytest.mark.parametrize("text", ["custom:batch=8", "custom:batch=x,seq=3", "custom:size=3,seq=4",
                                  "custom:batch=0,seq=8", "custom:batch=1,seq=8,loss=regression"])
def test_bad_custom_workloads_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        workloads.get(text)


def test_too_long_for_the_model_is_refused() -> None:
    with pytest.raises(UsageError, match="2048 positions"):
        workloads.get("custom:batch=1,seq=2049").check_fits(2048)


def test_unknown_workload() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean sst2"):
        workloads.get("sst-2")


def test_batches_are_seeded_and_shaped() -> None:
    workload = workloads.get("copa")
    a, b = workloads.make_batch(workload, 1024), workloads.make_batch(workload, 1024)
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape == (32, 32)
    assert a.labels.max() < workload.candidates


@pytest.mark.parametrize("name", ["sst2", "copa", "custom:batch=2,seq=32,targets=4"])
def test_each_loss_form_is_finite_and_differentiable(name: str) -> None:
    model = models.build("opt-tiny")
    workload = workloads.get(name)
    loss = workloads.loss(model, workload, workloads.make_batch(workload, model.config.vocab_size))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_classification_loss_is_over_label_words_at_the_last_position() -> None:
    model = models.build("opt-tiny")
    workload = workloads.get("sst2")
    batch = workloads.make_batch(workload, model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits[:, -1, batch.label_words]
        expected = torch.nn.functional.cross_entropy(logits, batch.labels)
        assert torch.allclose(workloads.loss(model, workload, batch), expected)
