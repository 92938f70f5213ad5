"""The seam between the plugin and its kernels: checks inputs, then picks an implementation.

On CUDA with float16/bfloat16 the Triton kernel runs; everywhere else the PyTorch reference (with one
logged reason). Both follow the contract of ``kernels/reference.py``.
"""

from __future__ import annotations

import contextlib

import torch

from ._log import log_once
from .kernels.reference import (
    DecodeKV,
    paged_decode_reference,
    physical_page_scores_reference,
    sampled_column_scores_reference,
    sparse_attention_reference,
    stripe_attention_reference,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_MAX_HEAD_DIM = 256
_backend = "auto"


def set_backend(name: str) -> None:
    """``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` (also on the CPU under
    ``TRITON_INTERPRET=1``, for tests) or ``"reference"``."""
    global _backend
    if name not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {name!r}.")
    _backend = name


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model spread over GPUs by
    ``device_map`` has layers on several devices)."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"sparse_attn_hf supports float16, bfloat16 and float32 attention, got {dtype}; "
            "load or cast the model to one of them (for example model.to(torch.bfloat16))."
        )


def _use_triton(query: torch.Tensor) -> bool:
    if _backend == "reference":
        return False
    if _backend == "triton":
        return True
    if query.device.type != "cuda":
        return False
    if query.dtype not in KERNEL_DTYPES:
        log_once(f"sparse_attn_hf: {query.dtype} runs the PyTorch reference (the Triton kernel takes fp16/bf16).")
        return False
    if query.shape[-1] > KERNEL_MAX_HEAD_DIM:
        log_once(f"sparse_attn_hf: head_dim {query.shape[-1]} > {KERNEL_MAX_HEAD_DIM} runs the PyTorch reference.")
        return False
    return True


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    q_first: int,
    k_pos: torch.Tensor | None,
    kv_start: torch.Tensor,
    streaming: torch.Tensor,
    sink: int,
    local: int,
    scale: float,
    tile: int = 256,
) -> torch.Tensor:
    """Dense + streaming attention of one layer -> [B, Lq, Hq, D].

    query [B, Hq, Lq, D] at slots ``q_first + i``; key/value [B, Hkv, Lk, D] at slots ``k_pos`` [B, Lk]
    (``None``: 0..Lk-1); kv_start [B]; streaming [Hkv] bool. Rule: ``kernels.reference``.
    """
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
    if streaming.shape != (key.shape[1],) or kv_start.shape != (batch,):
        raise ValueError(f"streaming must be [Hkv] = [{key.shape[1]}] and kv_start [B] = [{batch}].")
    if k_pos is not None and tuple(k_pos.shape) != (batch, key.shape[2]):
        raise ValueError(f"k_pos must be [B, Lk] = [{batch}, {key.shape[2]}], got {tuple(k_pos.shape)}.")
    if _use_triton(query):
        from .kernels.prefill import sparse_attention_triton

        with _on_device(query):
            return sparse_attention_triton(
                query, key, value, q_first=q_first, k_pos=k_pos, kv_start=kv_start, streaming=streaming,
                sink=sink, local=local, scale=scale,
            )
    q_pos = torch.arange(q_first, q_first + q_len, device=query.device).expand(batch, -1)
    if k_pos is None:
        k_pos = torch.arange(key.shape[2], device=query.device).expand(batch, -1)
    return sparse_attention_reference(
        query, key, value, q_pos=q_pos, k_pos=k_pos, kv_start=kv_start, streaming=streaming,
        sink=sink, local=local, scale=scale, tile=tile,
    )


def paged_decode(query: torch.Tensor, kv: DecodeKV, *, kv_start: torch.Tensor, sink: int, local: int,
                 scale: float) -> torch.Tensor:
    """One decode step of one layer over a SparseCache -> [B, Hq, D]. query [B, Hq, D] at slot
    ``kv.seen - 1``; contract: ``kernels.reference.paged_decode_reference``."""
    check_dtype(query.dtype)
    if query.ndim != 3 or query.shape[1] % kv.head_kind.shape[0]:
        raise ValueError(f"expected query [B, Hq, D] with Hq a multiple of {kv.head_kind.shape[0]} KV heads, "
                         f"got {tuple(query.shape)}.")
    page = kv.page_size
    if _use_triton(query) and page >= 16 and page & (page - 1) == 0:
        from .kernels.decode import paged_decode_triton

        with _on_device(query):
            return paged_decode_triton(query, kv, kv_start=kv_start, sink=sink, local=local, scale=scale)
    if query.is_cuda and _backend == "auto" and query.dtype in KERNEL_DTYPES:
        log_once(f"sparse_attn_hf: page_size {page} is not a power of two >= 16: decoding runs the PyTorch reference.")
    return paged_decode_reference(query, kv, kv_start=kv_start, sink=sink, local=local, scale=scale)


def physical_page_scores(query, key_min, key_max, *, kv_start, num_pages: int, page_size: int,
                         logical_page_size: int) -> torch.Tensor:
    """Page-selection scores [B, Hd, num_pages]; contract: ``kernels.reference.physical_page_scores_reference``."""
    common = dict(kv_start=kv_start, num_pages=num_pages, page_size=page_size, logical_page_size=logical_page_size)
    per_page = page_size // logical_page_size
    if _use_triton(query) and per_page & (per_page - 1) == 0 and query.shape[-1] >= 16:
        from .kernels.selection import physical_page_scores_triton

        with _on_device(query):
            return physical_page_scores_triton(query, key_min, key_max, **common)
    return physical_page_scores_reference(query, key_min, key_max, **common)


def append_token(key: torch.Tensor, value: torch.Tensor, tensors: dict, *, slot: int, kv_start: torch.Tensor,
                 head_kind: torch.Tensor, head_slot: torch.Tensor, sink: int, logical_page_size: int) -> bool:
    """Store one decode token of every KV head in a SparseCache layer's buffers with one Triton launch.
    Returns False where the kernel does not apply: the cache's PyTorch path (the contract) stores it."""
    if not _use_triton(key):
        return False
    from .kernels.append import append_token_triton

    with _on_device(key):
        append_token_triton(key, value, tensors, slot=slot, kv_start=kv_start, head_kind=head_kind,
                            head_slot=head_slot, sink=sink, logical_page_size=logical_page_size)
    return True


def sampled_column_scores(query, key, *, rows, q_first: int, kv_start, window, scale: float) -> torch.Tensor:
    """SampleAttention stage 1 -> float32 [B, Hkv, Lk]; contract:
    ``kernels.reference.sampled_column_scores_reference``."""
    if _use_triton(query):
        from .kernels.sampling import sampled_column_scores_triton

        with _on_device(query):
            return sampled_column_scores_triton(query, key, rows=rows, q_first=q_first, kv_start=kv_start,
                                                window=window, scale=scale)
    return sampled_column_scores_reference(query, key, rows=rows, q_first=q_first, kv_start=kv_start,
                                           window=window, scale=scale)


def stripe_attention(query, key, value, *, mask, scale: float, tile: int = 256) -> torch.Tensor:
    """Attention on a StripeMask (window + column stripes) -> [B, Lq, Hq, D]; contract:
    ``kernels.reference.stripe_attention_reference``."""
    if _use_triton(query):
        from .kernels.prefill import sparse_attention_triton

        with _on_device(query):
            return sparse_attention_triton(
                query, key, value, q_first=key.shape[2] - query.shape[2], k_pos=None, kv_start=mask.kv_start,
                streaming=torch.zeros(key.shape[1], dtype=torch.bool, device=query.device), sink=0, local=1,
                scale=scale, stripe_mask=mask)
    return stripe_attention_reference(query, key, value, mask=mask, scale=scale, tile=tile)
