"""OPT (Zhang et al., 2022): the ladder of the MeZO papers' tables, from the published architectures (FFN = 4h,
vocabulary 50272, 2048 positions; opt-350m with a 512-wide embedding projection and post-LayerNorm)."""

from __future__ import annotations

from zomem.models.spec import ModelSpec

SOURCE = "Zhang et al. (2022), OPT, Table 1, and the released configs"


def opt(name: str, hidden: int, layers: int, heads: int, *, vocab: int = 50272, published: float | None = None,
        params: int | None = None, embed_dim: int | None = None, pre_layernorm: bool = True,
        family: str = "opt") -> ModelSpec:
    """An OPT model of this shape."""
    return ModelSpec.of(name, family, "opt", {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "ffn_dim": 4 * hidden,
        "vocab_size": vocab, "max_position_embeddings": 2048, "word_embed_proj_dim": embed_dim or hidden,
        "do_layer_norm_before": pre_layernorm,
    }, published_params=published, params=params,
        source=SOURCE if published else "a test config of the same architecture")


#: the OPT sizes, smallest first: the order a largest-fit search walks
LADDER = (
    opt("opt-125m", 768, 12, 12, published=125e6, params=125_239_296),
    opt("opt-350m", 1024, 24, 16, embed_dim=512, pre_layernorm=False, published=331e6, params=331_196_416),
    opt("opt-1.3b", 2048, 24, 32, published=1.3e9, params=1_315_758_080),
    opt("opt-2.7b", 2560, 32, 32, published=2.7e9, params=2_651_596_800),
    opt("opt-6.7b", 4096, 32, 32, published=6.7e9, params=6_658_473_984),
    opt("opt-13b", 5120, 40, 40, published=12.9e9, params=12_853_473_280),
    opt("opt-30b", 7168, 48, 56, published=30.0e9, params=29_974_540_288),
    opt("opt-66b", 9216, 64, 72, published=65.7e9, params=65_719_701_504),
    opt("opt-175b", 12288, 96, 96, published=174.6e9, params=174_604_468_224),
)
#: small configs for tests, smallest first; same architecture, tiny vocabulary
TESTS = (
    opt("opt-tiny", 64, 2, 4, vocab=1024, family="test"),
    opt("opt-mini", 128, 4, 4, vocab=4096, family="test"),
    opt("opt-small", 256, 6, 8, vocab=8192, family="test"),
)
