"""OPT-family models built from their published architecture, with random weights.

Memory does not depend on weight values, so no model hub is touched: the model is constructed
on the meta device (free at any size), materialised empty on the target device and filled in place.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from zomem.errors import UsageError
from zomem.registry import Registry

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TUNINGS = ("full", "lora", "prefix")
INIT_SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """The architecture of one OPT model (FFN width is 4 × hidden throughout the ladder)."""

    name: str
    hidden: int
    layers: int
    heads: int
    vocab: int = 50272
    positions: int = 2048
    #: opt-350m projects a 512-wide embedding up to the hidden size
    embed_dim: int | None = None
    #: opt-350m is the one post-LayerNorm model of the ladder
    pre_layernorm: bool = True
    #: published parameter count, for the ladder models
    published_params: float | None = None

    def config(self) -> OPTConfig:
        """The transformers config, with the KV cache off (not part of fine-tuning)."""
        return OPTConfig(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            ffn_dim=4 * self.hidden,
            vocab_size=self.vocab,
            max_position_embeddings=self.positions,
            word_embed_proj_dim=self.embed_dim or self.hidden,
            do_layer_norm_before=self.pre_layernorm,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            use_cache=False,
        )


MODELS: Registry[ModelSpec] = Registry("model")
#: the OPT sizes, smallest first: the order a largest-fit search walks
LADDER = (
    ModelSpec("opt-125m", 768, 12, 12, published_params=125e6),
    ModelSpec("opt-350m", 1024, 24, 16, embed_dim=512, pre_layernorm=False, published_params=331e6),
    ModelSpec("opt-1.3b", 2048, 24, 32, published_params=1.3e9),
    ModelSpec("opt-2.7b", 2560, 32, 32, published_params=2.7e9),
    ModelSpec("opt-6.7b", 4096, 32, 32, published_params=6.7e9),
    ModelSpec("opt-13b", 5120, 40, 40, published_params=12.9e9),
    ModelSpec("opt-30b", 7168, 48, 56, published_params=30.0e9),
    ModelSpec("opt-66b", 9216, 64, 72, published_params=65.7e9),
    ModelSpec("opt-175b", 12288, 96, 96, published_params=174.6e9),
)
#: small configs for tests, smallest first; same architecture, tiny vocabulary
TEST_LADDER = (
    ModelSpec("opt-tiny", 64, 2, 4, vocab=1024),
    ModelSpec("opt-mini", 128, 4, 4, vocab=4096),
    ModelSpec("opt-small", 256, 6, 8, vocab=8192),
)
for _spec in LADDER + TEST_LADDER:
    MODELS.register(_spec.name, _spec)


def spec(name: str) -> ModelSpec:
    """The architecture registered as ``name``."""
    return MODELS.get(name)


def dtype(name: str) -> torch.dtype:
    """The torch dtype for a dtype name (float32, float16, bfloat16)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}. Valid: {', '.join(DTYPES)}") from None


def build_meta(model: str | ModelSpec, torch_dtype: torch.dtype = torch.float32) -> OPTForCausalLM:
    """The model on the meta device: its shapes and placement cost nothing to compute."""
    model_spec = spec(model) if isinstance(model, str) else model
    with torch.device("meta"):
        module = OPTForCausalLM(model_spec.config())
    return module.to(dtype=torch_dtype)


def build(
    model: str | ModelSpec,
    device: torch.device | str = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    seed: int = INIT_SEED,
) -> OPTForCausalLM:
    """The model on ``device`` in ``torch_dtype``, with seeded random weights, in eval mode."""
    module = build_meta(model, torch_dtype)
    _materialise(module, torch.device(device))
    _fill(module, seed)
    return module.eval()


def _materialise(module: nn.Module, device: torch.device) -> None:
    # nn.Module.to_empty gives each module its own copy of a shared tensor, which would untie the
    # token embedding from the LM head (and allocate it twice): map each meta tensor exactly once.
    memo: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(
                        torch.empty_like(param, device=device), requires_grad=param.requires_grad
                    )
                sub._parameters[name] = memo[id(param)]
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = memo.setdefault(id(buffer), torch.empty_like(buffer, device=device))


@torch.no_grad()
def _fill(module: OPTForCausalLM, seed: int) -> None:
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    std = module.config.init_std
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            sub.weight.fill_(1.0)
            sub.bias.zero_()
        elif isinstance(sub, (nn.Linear, nn.Embedding)):
            if sub.weight.device.type != "meta":
                sub.weight.normal_(0.0, std, generator=generator)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()


def param_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once each (tied weights are one parameter)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def param_bytes(module: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the parameters (and buffers, for all of them), counted once each."""
    params = sum(p.nbytes for p in module.parameters() if p.requires_grad or not trainable_only)
    return params if trainable_only else params + sum(b.nbytes for b in module.buffers())


#: MeZO's PEFT settings (Malladi et al., 2023): LoRA r=8, alpha=16 on the query and value
#: projections; prefix tuning with 5 virtual tokens in every layer.
LORA_SETTINGS = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
PREFIX_TOKENS = 5


def apply_tuning(module: nn.Module, tuning: str) -> nn.Module:
    """Mark what is trained: ``full`` trains every parameter; ``lora``/``prefix`` wrap the model with ``peft``
    (MeZO's settings) so that only the adapters or the prefix train, in the model's dtype, in eval mode."""
    if tuning == "full":
        module.requires_grad_(True)
        return module
    if tuning not in TUNINGS:
        raise UsageError(f"unknown tuning {tuning!r}. Valid: {', '.join(TUNINGS)}")
    # Imported here: peft costs most of a second, and full fine-tuning never needs it.
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    dtype = next(module.parameters()).dtype
    if tuning == "lora":
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, **LORA_SETTINGS)
    else:
        config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=PREFIX_TOKENS)
    # peft would keep float32 adapters beside a float16/bfloat16 model; the cell's dtype applies to all of it.
    with warnings.catch_warnings():
        # peft asks transformers 5 for a deprecated property: nothing a zomem user can act on
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        wrapped = get_peft_model(module, config, autocast_adapter_dtype=False)
    return wrapped.to(dtype).eval()
