"""A Llama-3-8B-shaped model with random bf16 weights on the GPU (shape only: no weights are downloaded)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama8b_config(layers: int, max_len: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=max_len)


def build(layers: int, max_len: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama8b_config(layers, max_len))
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()
