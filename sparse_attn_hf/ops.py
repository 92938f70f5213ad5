"""The seam between the plugin and its kernels: checks inputs, then picks an implementation.

Only the PyTorch reference exists in this version; it runs on every device. The Triton kernels
plug in here, behind the same contracts (see ``kernels/reference.py``).
"""

from __future__ import annotations

import torch

from ._log import log_once
from .kernels.reference import sparse_attention_reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"sparse_attn_hf supports float16, bfloat16 and float32 attention, got {dtype}; "
            "load or cast the model to one of them (for example model.to(torch.bfloat16))."
        )


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    kv_start: torch.Tensor,
    streaming: torch.Tensor,
    sink: int,
    local: int,
    scale: float,
    tile: int = 256,
) -> torch.Tensor:
    """Dense + streaming attention of one layer. Shapes and rule: ``kernels.reference``."""
    check_dtype(query.dtype)
    if query.ndim != 4 or key.ndim != 4 or key.shape != value.shape:
        raise ValueError(
            f"expected query [B, Hq, Lq, D] and key/value [B, Hkv, Lk, D] of one shape, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    batch, num_heads, q_len, head_dim = query.shape
    if key.shape[0] != batch or key.shape[3] != head_dim or num_heads % key.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit key {tuple(key.shape)}: batch and head_dim must agree and "
            "the query heads must be a multiple of the KV heads."
        )
    if q_len == 0 or key.shape[2] == 0:
        raise ValueError("attention over an empty sequence (0 tokens): pass at least one token.")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}.")
    if query.device.type == "cuda":
        log_once("sparse_attn_hf: no Triton kernel in this version, CUDA runs the PyTorch reference.")
    return sparse_attention_reference(
        query, key, value, q_pos=q_pos, k_pos=k_pos, kv_start=kv_start, streaming=streaming,
        sink=sink, local=local, scale=scale, tile=tile,
    )
