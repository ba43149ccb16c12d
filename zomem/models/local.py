"""A user's own model, described by a local ``config.json``: profiled from its shape, without its weights."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from zomem.errors import UsageError
from zomem.models.spec import ModelSpec

#: config keys that say how a checkpoint was saved, not what the model is
IGNORED = ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map",
           "model_type", "quantization_config")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` names a config file or folder rather than a registered model."""
    return name.endswith(".json") or "/" in name or Path(name).is_dir()


def load(name: str) -> ModelSpec:
    """The spec of the model the ``config.json`` at ``name`` (or in the folder ``name``) describes; a config
    transformers cannot build as a causal LM is refused, before anything is built."""
    path = Path(name)
    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read the model config {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not a JSON config: {exc}") from exc
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"{path}: model_type {model_type!r} is not one transformers knows, so it cannot be built")
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    architectures = data.get("architectures") or []
    if causal is None or (architectures and causal not in architectures):
        has = f" (its architectures: {', '.join(architectures)})" if architectures else ""
        raise UsageError(f"{path}: a {model_type} model has no causal-LM head{has}; zomem measures causal LMs "
                         "(AutoModelForCausalLM)")
    settings = {k: v for k, v in data.items() if k not in IGNORED}
    return ModelSpec.of(name, "local", model_type, settings, source=f"local config {path}")
