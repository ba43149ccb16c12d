"""Llama 2, Llama 3.x and Mistral: RMSNorm, rotary positions, a gated (SwiGLU) MLP of three matrices, grouped-query
attention, untied heads (but Llama-3.2's small models); shapes from the published configs."""

from __future__ import annotations

from zomem.models.spec import ModelSpec

LLAMA2 = "Touvron et al. (2023), Llama 2, and the released configs (meta-llama/Llama-2-*-hf)"
LLAMA3 = "Llama Team (2024), The Llama 3 Herd of Models, and the released configs (meta-llama/Llama-3.*)"
MISTRAL = "Jiang et al. (2023), Mistral 7B, and the released config of v0.3 (mistralai/Mistral-7B-v0.3)"
#: Llama 3.1's rope scaling for its 131,072 positions (3.2 stretches the same frequencies by 32 instead of 8)
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def llama(name: str, family: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
          *, positions: int, rope_theta: float, tied: bool = False, rope_factor: float | None = None,
          params: int | None = None, source: str = "", model_type: str = "llama") -> ModelSpec:
    """A Llama-architecture model of this shape (Mistral shares it)."""
    settings = {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
        "max_position_embeddings": positions, "rope_theta": rope_theta, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
    }
    if rope_factor is not None:
        settings["rope_scaling"] = {**LLAMA3_ROPE, "factor": rope_factor}
    return ModelSpec.of(name, family, model_type, settings, published_params=params, params=params,
                        source=source or "a test config of the same architecture")


def llama2(name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
           params: int) -> ModelSpec:
    """A Llama 2 model: 4,096 positions, rope θ = 10,000, a 32,000-token vocabulary."""
    return llama(name, "llama-2", hidden, layers, heads, kv_heads, intermediate, 32000, positions=4096,
                 rope_theta=10000.0, params=params, source=LLAMA2)


def llama3(name: str, hidden: int, layers: int, heads: int, intermediate: int, params: int, *,
           tied: bool = False, rope_factor: float = 8.0) -> ModelSpec:
    """A Llama 3.1/3.2 model: 8 key/value heads, 131,072 positions (llama3 rope scaling), θ = 500,000, 128,256
    tokens."""
    return llama(name, "llama-3", hidden, layers, heads, 8, intermediate, 128256, positions=131072,
                 rope_theta=500000.0, tied=tied, rope_factor=rope_factor, params=params, source=LLAMA3)


MODELS = (
    llama2("llama-2-7b", 4096, 32, 32, 32, 11008, 6_738_415_616),
    llama2("llama-2-13b", 5120, 40, 40, 40, 13824, 13_015_864_320),
    llama2("llama-2-70b", 8192, 80, 64, 8, 28672, 68_976_648_192),
    llama3("llama-3.2-1b", 2048, 16, 32, 8192, 1_235_814_400, tied=True, rope_factor=32.0),
    llama3("llama-3.2-3b", 3072, 28, 24, 8192, 3_212_749_824, tied=True, rope_factor=32.0),
    llama3("llama-3.1-8b", 4096, 32, 32, 14336, 8_030_261_248),
    llama3("llama-3.1-70b", 8192, 80, 64, 28672, 70_553_706_496),
    llama3("llama-3.1-405b", 16384, 126, 128, 53248, 405_853_388_800),
    llama("mistral-7b", "mistral", 4096, 32, 32, 8, 14336, 32768, positions=32768, rope_theta=1e6,
          params=7_248_023_552, source=MISTRAL, model_type="mistral"),
)
TESTS = (
    llama("llama-tiny", "test", 64, 2, 4, 2, 176, 1024, positions=16384, rope_theta=500000.0, rope_factor=8.0),
    llama("mistral-tiny", "test", 64, 2, 4, 2, 224, 1024, positions=4096, rope_theta=1e6, model_type="mistral"),
)
