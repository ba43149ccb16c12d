"""What a model is to zomem: a name, a family and the transformers config it is built from (never weights)."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

#: the config attributes that hold a dropout probability: fine-tuning here measures memory and time, not a model,
#: and a zero dropout keeps every optimizer's forwards comparable
DROPOUTS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop",
            "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")


@dataclass(frozen=True)
class ModelSpec:
    """A model: its name, its family, the ``model_type`` and settings of its transformers config, and where the
    shape comes from. The settings are kept as JSON so a spec is hashable and its config rebuilt identically."""

    name: str
    family: str
    model_type: str
    settings_json: str
    #: the parameter count the publisher gives, for the ladders (None for test configs and local files)
    published_params: float | None = None
    #: the exact parameter count this config builds (tied weights once), checked by a test; None: count it
    params: int | None = None
    #: where the shape comes from (a paper, a model card, a local file)
    source: str = ""

    @classmethod
    def of(cls, name: str, family: str, model_type: str, settings: dict[str, Any], **fields: Any) -> ModelSpec:
        """A spec from its config's keyword arguments."""
        return cls(name, family, model_type, json.dumps(settings, sort_keys=True), **fields)

    @property
    def settings(self) -> dict[str, Any]:
        """The config's keyword arguments."""
        return json.loads(self.settings_json)

    def config(self) -> PretrainedConfig:
        """The transformers config, set up for fine-tuning: no KV cache (not part of fine-tuning), no dropout. A
        copy: building a model writes into its config."""
        return copy.deepcopy(_config(self))

    @property
    def positions(self) -> int:
        """The longest sequence the model takes."""
        return int(getattr(_config(self), "max_position_embeddings", None) or getattr(_config(self), "n_positions"))

    @property
    def hidden(self) -> int:
        """The hidden size."""
        return int(_config(self).hidden_size)

    @property
    def layers(self) -> int:
        """The number of decoder layers."""
        return int(_config(self).num_hidden_layers)

    @property
    def heads(self) -> int:
        """Attention heads per layer."""
        return int(_config(self).num_attention_heads)

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer (fewer than the heads under grouped-query attention)."""
        config = _config(self)
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    @property
    def vocab(self) -> int:
        """The vocabulary size."""
        return int(_config(self).vocab_size)

    @property
    def tied(self) -> bool:
        """Whether the LM head is the token embedding (one parameter, counted once)."""
        return bool(getattr(_config(self), "tie_word_embeddings", False))

    @property
    def head_width(self) -> int:
        """The width of the vector the LM head reads (OPT-350m projects its 1024 down to 512 first)."""
        config = _config(self)
        return int(getattr(config, "word_embed_proj_dim", None) or config.hidden_size)


@functools.cache
def _config(spec: ModelSpec) -> PretrainedConfig:
    config = AutoConfig.for_model(spec.model_type, **spec.settings)
    config.use_cache = False
    for name in DROPOUTS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return config
