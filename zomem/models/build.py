"""Build a model from its spec with random weights: constructed on the meta device (free at any size), its
parameters materialised empty on the target device and filled in place. Memory does not depend on weight values,
so no model hub is touched."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from zomem.models.spec import ModelSpec
from zomem.shards import local, offset

INIT_SEED = 0


def build_meta(spec: ModelSpec, torch_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with its parameters on the meta device in ``torch_dtype``; its buffers (rotary frequencies, say)
    are computed on CPU, where they are small."""
    with init_empty_weights(include_buffers=False):
        module = AutoModelForCausalLM.from_config(spec.config())
    module.tie_weights()  # the empty-weights context re-creates the parameters tying had shared
    for param in module.parameters():
        param.data = param.data.to(torch_dtype)
    return module


def build(spec: ModelSpec, device: torch.device | str = "cpu", torch_dtype: torch.dtype = torch.float32,
          seed: int = INIT_SEED) -> nn.Module:
    """The model on ``device`` in ``torch_dtype``, with seeded random weights, in eval mode."""
    module = build_meta(spec, torch_dtype)
    materialise(module, torch.device(device))
    fill(module, seed)
    return module.eval()


def materialise(module: nn.Module, device: torch.device) -> None:
    """Give every meta parameter storage on ``device`` and move the buffers there, each shared tensor once."""
    # nn.Module.to_empty gives each module its own copy of a shared tensor, which would untie the token embedding
    # from the LM head (and allocate it twice): map each tensor exactly once.
    memo: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(torch.empty_like(param, device=device),
                                                   requires_grad=param.requires_grad)
                sub._parameters[name] = memo[id(param)]
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                if id(buffer) not in memo:
                    memo[id(buffer)] = (torch.empty_like(buffer, device=device) if buffer.device.type == "meta"
                                        else buffer.to(device))
                sub._buffers[name] = memo[id(buffer)]


@torch.no_grad()
def fill(module: nn.Module, seed: int) -> None:
    """Seeded random weights, the way the architectures initialise: matrices (projections, embeddings) from
    N(0, σ²) with the config's σ, norm weights 1, biases 0. A sharded matrix is drawn whole, one at a time, and
    this rank keeps its shard: the weights are those of the same model unsharded."""
    config = module.config
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02
    device = local(next(module.parameters())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in module.named_parameters():  # tied parameters appear once
        mine = local(param)
        if param.ndim >= 2:
            whole = mine if mine is param else torch.empty(param.shape, dtype=param.dtype, device=device)
            whole.normal_(0.0, std, generator=generator)
            if whole is not mine:
                mine.copy_(whole.view(-1)[offset(param):][: mine.numel()].view_as(mine))
        elif name.endswith("bias"):
            mine.zero_()
        else:
            mine.fill_(1.0)
