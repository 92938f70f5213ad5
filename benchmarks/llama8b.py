"""Full-size model shapes with random bf16 weights on the GPU (shape only: no weights are downloaded).

``build(layers, max_len)`` is the project's headline shape, Llama-3-8B; ``build_family(name, max_len)`` builds the
shapes of today's families from their published ``config.json`` values (sizes, heads, windows, experts): the
benchmark measures their attention and cache paths, not their answers.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama8b_config(layers: int, max_len: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=max_len)


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
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        cls = type(AutoModelForCausalLM.from_config(_tiny(config)))
    return "sdpa" if cls._supports_sdpa else "flex_attention" if cuda else "eager"


def _tiny(config):
    import copy

    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    return config


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


def build(layers: int, max_len: int) -> LlamaForCausalLM:
    return _random_bf16(llama8b_config(layers, max_len))


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
