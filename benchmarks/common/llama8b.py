"""Full-size model shapes with random bf16 weights on the GPU (shape only: no weights are downloaded).

``build(layers, max_len)`` is the project's headline shape, Llama-3-8B; ``build_family(name, max_len)`` builds the
shapes of today's families from their published ``config.json`` values (sizes, heads, windows, experts): the
benchmark measures their attention and cache paths, not their answers.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama8b_config(layers: int, max_len: int, **changes) -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=max_len, **changes)


def _qwen3_8b(max_len: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, max_position_embeddings=max_len, tie_word_embeddings=False)


def _gemma3_12b(max_len: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=1024, max_position_embeddings=max(max_len, 131072))


def _gpt_oss_20b(max_len: int):
    from transformers import GptOssConfig

    return GptOssConfig(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, sliding_window=128, max_position_embeddings=max(max_len, 131072))


FAMILIES = {  # name: config builder (the published checkpoint whose config.json it copies)
    "llama3-8b": lambda max_len: llama8b_config(32, max_len),  # meta-llama/Meta-Llama-3-8B
    "qwen3-8b": _qwen3_8b,  # Qwen/Qwen3-8B
    "gemma3-12b": _gemma3_12b,  # google/gemma-3-12b-it, text tower
    "gpt-oss-20b": _gpt_oss_20b,  # openai/gpt-oss-20b
}


def stock_attention(config, cuda: bool = True) -> str:
    """What stock Transformers runs best without downloaded kernels: SDPA, or on CUDA FlexAttention for a family
    without an SDPA path (GPT-OSS: its learned sinks; its default, eager, would materialise every score matrix)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return "sdpa" if MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_sdpa else "flex_attention" if cuda else "eager"


def _random_bf16(config):
    from transformers import AutoModelForCausalLM

    attention = stock_attention(config)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def build(layers: int, max_len: int, structured: bool = False) -> LlamaForCausalLM:
    """The Llama-3-8B shape; ``structured``: with attention of planted key columns (``plant_columns``)."""
    model = _random_bf16(llama8b_config(layers, max_len, attention_bias=structured))
    return plant_columns(model) if structured else model


def place_sinks(ids: torch.Tensor, mask: torch.Tensor, count: int = 4) -> torch.Tensor:
    """``ids`` with no sink token except ``count`` of them per row, spread over the row's real tokens (the first
    at its first token), for a model given ``plant_columns``."""
    ids = ids.clone()
    ids[(ids >= min(SINK_TOKENS)) & (ids <= max(SINK_TOKENS))] = max(SINK_TOKENS) + 1
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        span = ids.shape[1] - start
        for i in range(count):
            ids[row, start + i * span // count] = SINK_TOKENS[i % len(SINK_TOKENS)]
    return ids


def build_family(name: str, max_len: int, layers: int | None = None):
    config = FAMILIES[name](max_len)
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return _random_bf16(config)


def tiny_family(name: str, max_len: int):
    """The family's architecture at a tiny size on the CPU (float32): the benchmark's bookkeeping only."""
    from transformers import AutoModelForCausalLM

    config = FAMILIES[name](max_len)
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    if getattr(config, "layer_types", None):
        small["layer_types"] = ["sliding_attention", "full_attention"]
        small["sliding_window"] = 16
    if hasattr(config, "num_local_experts"):
        small.update(num_local_experts=4, num_experts_per_tok=2)
    if hasattr(config, "query_pre_attn_scalar"):
        small["query_pre_attn_scalar"] = 16
    for key, value in small.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=stock_attention(config, cuda=False)).eval()


SINK_TOKENS = (7, 11, 13, 17)  # token ids that every query of the structured model attends to


def plant_columns(model, score: float = 16.0, mark: float = 1000.0):
    """Give a random-weight Llama-family model the attention structure SampleAttention is for: in every layer
    every query head puts most of its mass on the ``SINK_TOKENS`` wherever they stand (a few strong key columns),
    the rest stays diffuse. Random weights alone give diffuse attention (every mask too dense to pay).

    The sink tokens' embeddings get a large hidden unit 0 (``mark``: it outlives the residual stream's random
    updates); in every layer the last dimension of each KV head reads that unit alone and the last dimension of
    each query head is a constant bias, their RoPE partners zeroed (the pair of lowest frequency: cos > 0.99 over
    128K positions), so that a sink key scores about ``score`` above the rest (the RMS norm turns ``mark`` into
    sqrt(hidden_size)). Needs ``config.attention_bias=True`` (the query bias)."""
    config = model.config
    dim, heads, kv_heads = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    strength = score * dim**0.5 / config.hidden_size**0.5
    last, partner = dim - 1, dim // 2 - 1
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0] = 0.0
        embed[list(SINK_TOKENS), 0] = mark
        for layer in model.model.layers:
            attention = layer.self_attn
            q_weight = attention.q_proj.weight.view(heads, dim, -1)
            q_weight[:, [partner, last]] = 0.0
            q_bias = attention.q_proj.bias.view(heads, dim)
            q_bias[:, partner], q_bias[:, last] = 0.0, strength
            k_weight = attention.k_proj.weight.view(kv_heads, dim, -1)
            k_weight[:, [partner, last]] = 0.0
            k_weight[:, last, 0] = 1.0
            if attention.k_proj.bias is not None:
                attention.k_proj.bias.view(kv_heads, dim)[:, [partner, last]] = 0.0
    return model
