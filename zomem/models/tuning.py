"""What is trained: every parameter, or LoRA or prefix adapters from ``peft`` with MeZO's settings."""

from __future__ import annotations

import warnings

from torch import nn

from zomem.errors import UsageError

TUNINGS = ("full", "lora", "prefix")
#: MeZO's PEFT settings (Malladi et al., 2023): LoRA r=8, alpha=16 on the query and value projections (peft's
#: default targets for each model type, so every family's own module names); prefix tuning with 5 virtual tokens
#: in every layer
LORA_SETTINGS = {"r": 8, "lora_alpha": 16}
PREFIX_TOKENS = 5


def load_tuning(tuning: str) -> None:
    """Import what ``tuning`` needs: peft for lora and prefix, with what it imports itself (bitsandbytes and torchao,
    where they are installed: over 150 MiB). A measuring child does it before its baseline reading, so that these
    libraries are part of the process floor, not of the step."""
    if tuning != "full":
        import peft  # noqa: F401


def apply_tuning(module: nn.Module, tuning: str) -> nn.Module:
    """Mark what is trained: ``full`` trains every parameter; ``lora``/``prefix`` wrap the model with ``peft``
    (MeZO's settings) so that only the adapters or the prefix train, in the model's dtype, in eval mode. A model
    peft cannot tune that way is refused with a UsageError."""
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
        try:
            wrapped = get_peft_model(module, config, autocast_adapter_dtype=False)
        except (ValueError, TypeError, NotImplementedError, AttributeError) as exc:
            model_type = getattr(module.config, "model_type", "this")
            raise UsageError(f"peft cannot apply {tuning} tuning to a {model_type} model: "
                             f"{str(exc).splitlines()[0]}") from exc
    for param in wrapped.parameters():  # what peft added; the model's own weights are left as they are
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return wrapped.eval()


#: non-reentrant checkpointing, torch's recommended form (and transformers' default from version 5): it works whether or
#: not the layers' inputs require grad, so LoRA's frozen embeddings need no workaround
CHECKPOINT_KWARGS = {"use_reentrant": False}


def enable_checkpointing(module: nn.Module) -> nn.Module:
    """Have each decoder layer recompute its activations in backward instead of keeping them, through transformers'
    activation (gradient) checkpointing, as Trainer's ``gradient_checkpointing=True`` does. transformers checkpoints
    only in training mode, so the model is put in it: with dropout 0 here, that changes nothing else."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    if hasattr(base, "activation_checkpointing_enable"):  # transformers 5 renamed it
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_KWARGS)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_KWARGS)
    return module.train()
