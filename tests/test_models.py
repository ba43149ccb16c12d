import math
import time

import pytest
import torch
from torch import nn

from zomem import models
from zomem.errors import UnknownNameError, UsageError


@pytest.mark.parametrize("spec", models.LADDER, ids=lambda s: s.name)
def test_ladder_parameter_counts_match_published_sizes(spec: models.ModelSpec) -> None:
    count = models.param_count(models.build_meta(spec))
    published = spec.published_params
    # "1.3B" and "2.7B" are published to two digits; the released checkpoints have 1.316B and 2.652B,
    # which is what this architecture gives, so the tolerance is 1% or the rounding of the published figure.
    half_unit = 0.5 * 10 ** (math.floor(math.log10(published)) - 1)
    assert abs(count - published) <= max(0.01 * published, half_unit)


def test_released_checkpoint_counts_exactly() -> None:
    # Counts of the released OPT checkpoints (tied embedding counted once).
    assert models.param_count(models.build_meta("opt-125m")) == 125_239_296
    assert models.param_count(models.build_meta("opt-350m")) == 331_196_416
    assert models.param_count(models.build_meta("opt-1.3b")) == 1_315_758_080


def test_opt_350m_has_projection_and_post_layernorm() -> None:
    module = models.build_meta("opt-350m")
    decoder = module.model.decoder
    assert decoder.project_in.weight.shape == (1024, 512)
    assert decoder.embed_tokens.weight.shape == (50272, 512)
    assert not module.config.do_layer_norm_before


def test_opt_125m_materialises_fast_with_tied_weights() -> None:
    start = time.perf_counter()
    module = models.build("opt-125m", "cpu", torch.float32)
    assert time.perf_counter() - start < 5.0
    assert module.lm_head.weight is module.model.decoder.embed_tokens.weight
    assert not module.config.use_cache
    weights = module.model.decoder.layers[0].fc1.weight
    assert abs(weights.std().item() - module.config.init_std) < 1e-3
    assert torch.equal(module.model.decoder.final_layer_norm.weight, torch.ones(768))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_build_in_each_dtype_runs_a_forward(dtype: torch.dtype) -> None:
    module = models.build("opt-tiny", "cpu", dtype)
    assert all(p.dtype == dtype for p in module.parameters())
    with torch.no_grad():
        logits = module(input_ids=torch.randint(0, 1024, (2, 8))).logits
    assert logits.shape == (2, 8, 1024) and torch.isfinite(logits).all()


def test_build_is_seeded() -> None:
    a, b = models.build("opt-tiny"), models.build("opt-tiny")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_param_bytes_counts_tied_weight_once() -> None:
    module = models.build("opt-tiny")
    unique = {id(p): p for m in module.modules() for p in m.parameters(recurse=False)}
    assert models.param_bytes(module) == sum(p.nbytes for p in unique.values())


def test_full_tuning_trains_everything() -> None:
    module = models.apply_tuning(models.build("opt-tiny"), "full")
    assert models.param_count(module, trainable_only=True) == models.param_count(module)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="opt-125m"):
        models.spec("opt-125")
    with pytest.raises(UsageError, match="float32"):
        models.dtype("float8")


def test_materialise_keeps_shared_tensors_shared() -> None:
    with torch.device("meta"):
        shared = nn.Linear(4, 4)
        pair = nn.ModuleList([shared, nn.Linear(4, 4)])
    pair[1].weight = shared.weight
    models.materialise(pair, torch.device("cpu"))
    assert pair[1].weight is pair[0].weight and pair[0].weight.device.type == "cpu"
