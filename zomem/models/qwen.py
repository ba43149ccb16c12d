"""Qwen2.5 (Qwen Team, 2024): the Llama architecture with biases on the query, key and value projections, a
151,936-token vocabulary (152,064 from 7B on), heads tied to the embeddings up to 3B; shapes from the released
configs (Qwen/Qwen2.5-*)."""

from __future__ import annotations

from zomem.models.spec import ModelSpec

SOURCE = "Qwen Team (2024), Qwen2.5 Technical Report, and the released configs (Qwen/Qwen2.5-*)"


def qwen(name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, *,
         positions: int, tied: bool, params: int | None = None, family: str = "qwen2.5") -> ModelSpec:
    """A Qwen2.5 model of this shape."""
    return ModelSpec.of(name, family, "qwen2", {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
        "max_position_embeddings": positions, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": tied,
        "use_sliding_window": False,
    }, published_params=params, params=params, source=SOURCE if params else "a test config of the same architecture")


MODELS = (
    qwen("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, positions=32768, tied=True, params=494_032_768),
    qwen("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, positions=131072, tied=True, params=1_543_714_304),
    qwen("qwen2.5-3b", 2048, 36, 16, 2, 11008, 151936, positions=32768, tied=True, params=3_085_938_688),
    qwen("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, positions=131072, tied=False, params=7_615_616_512),
    qwen("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, positions=131072, tied=False, params=14_770_033_664),
    qwen("qwen2.5-32b", 5120, 64, 40, 8, 27648, 152064, positions=131072, tied=False, params=32_763_876_352),
    qwen("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, positions=131072, tied=False, params=72_706_203_648),
)
TESTS = (qwen("qwen2.5-tiny", 64, 2, 4, 2, 176, 1024, positions=2048, tied=True, family="test"),)
