"""Attention over packed requests of different lengths (Transformers' continuous batching): flash's variable-length
kernel on CUDA (``torch.nn.attention.varlen.varlen_attn``: one launch for every request, the lengths read on the
device), the reference elsewhere. Contract: ``kernels.reference.varlen_attention_reference``."""

from __future__ import annotations

import importlib.util

import torch

from ..kernels.reference import varlen_attention_reference
from .dispatch import KERNEL_DTYPES

_HAS_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None  # PyTorch 2.9 and later


def varlen_available(tensor: torch.Tensor) -> bool:
    """Whether flash's variable-length kernel can take ``tensor``'s device and dtype here."""
    return tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and _HAS_VARLEN


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                     cu_k: torch.Tensor, max_q: int, max_k: int, *, scale: float, window: tuple[int, int] = (-1, -1),
                     used_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T_q, Hq, D], float32 LSE [T_q, Hq]) of packed requests (the reference's contract; ``max_q``/``max_k``:
    the longest request's rows and keys, host integers the caller knows without reading the device)."""
    if not varlen_available(query):
        return varlen_attention_reference(query, key, value, cu_q, cu_k, scale=scale, window=window, used_k=used_k)
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    out, lse = varlen_attn(query, key, value, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                           return_aux=AuxRequest(lse=True), scale=scale, window_size=window,
                           enable_gqa=query.shape[1] != key.shape[1],
                           seqused_k=None if used_k is None else used_k.to(torch.int32))
    if lse.shape[0] == query.shape[1]:  # flash's variable-length forward returns it [Hq, T_q]
        lse = lse.transpose(0, 1)
    return out, lse.float()
