"""Prefill attention ops: streaming + dense heads of one layer (``sparse_attention``), SampleAttention's two stages
(``sampled_column_scores``, ``stripe_attention``), FP8 pages read back for a prompt chunk (``read_fp8_pages``).
Contracts: ``kernels.reference`` (``kernels.fp8`` for the pages)."""

from __future__ import annotations

import torch

from .. import cost
from ..kernels.fp8 import dequantize_pages, read_pages_triton
from ..kernels.layout import LogitTerms, Visibility
from ..kernels.reference import (
    sampled_column_scores_reference,
    sparse_attention_reference,
    stripe_attention_reference,
)
from . import dispatch
from .dispatch import _on_device, _use_triton, check_dtype


def _check_attention_inputs(query, key, value, kv_start) -> None:
    check_dtype(query.dtype)
    if query.ndim != 4 or key.ndim != 4 or key.shape != value.shape:
        raise ValueError(
            f"expected query [B, Hq, Lq, D] and key/value [B, Hkv, Lk, D] of one shape, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    batch, num_heads, q_len, head_dim = query.shape
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"query {tuple(query.shape)} does not fit key {tuple(key.shape)}: batch and head_dim must agree.")
    if q_len == 0 or key.shape[2] == 0:
        raise ValueError("attention over an empty sequence (0 tokens): pass at least one token.")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}.")
    if kv_start.shape != (batch,):
        raise ValueError(f"kv_start must be [B] = [{batch}], got {tuple(kv_start.shape)}.")


def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: Visibility,
                     terms: LogitTerms, *, tile: int = 256, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense + streaming attention of one layer -> [B, Lq, Hq, D].

    query [B, Hq, Lq, D] at slots ``visible.q_first + i``; key/value [B, Hkv, Lk, D] at slots ``visible.k_pos``
    [B, Lk] (``None``: 0..Lk-1); ``visible.streaming`` [Hkv] bool (None: every head dense). Rule and terms:
    ``kernels.reference``.

    ``visible.heads`` (int64 [n]) restricts the call to the query heads of those KV-head groups of ``query``
    (Hq = ``groups`` x Hkv_total, query head ``h * groups + g`` belongs to KV head ``h``): key/value then hold
    the n heads in order, or every KV head when ``key_all_heads`` (head ``heads[i]`` is read, no copy);
    ``streaming`` is [n]; the result goes into those heads of ``out`` [B, Lq, Hq, D] (required), the other
    heads are left as they are. ``terms.sinks`` (float [Hq]) are by query head of ``query``.
    """
    kv_start, heads, groups = visible.kv_start, visible.heads, visible.groups
    _check_attention_inputs(query, key, value, kv_start)
    batch, num_heads, q_len, head_dim = query.shape
    if heads is None:
        if num_heads % key.shape[1]:
            raise ValueError(f"the query heads ({num_heads}) must be a multiple of the KV heads ({key.shape[1]}).")
        n = key.shape[1]
    else:
        n = heads.shape[0]
        if groups is None:
            raise ValueError("Visibility.heads needs Visibility.groups (the query heads of each KV head).")
        if (out is None or out.shape != (batch, q_len, num_heads, head_dim) or heads.ndim != 1
                or num_heads % groups or (not visible.key_all_heads and key.shape[1] != n)
                or (visible.key_all_heads and key.shape[1] * groups != num_heads)):
            raise ValueError("with Visibility.heads, pass out [B, Lq, Hq, D] and key/value holding those heads "
                             "(or every KV head with key_all_heads=True).")
    streaming = visible.streaming_flags(n, query.device)
    if visible.streaming is None:
        visible = visible.but(streaming=streaming)
    if streaming.shape != (n,):
        raise ValueError(f"streaming must be [{n}] (one flag per attended KV head), got {tuple(streaming.shape)}.")
    k_pos = visible.k_pos
    if k_pos is not None and tuple(k_pos.shape) != (batch, key.shape[2]):
        raise ValueError(f"k_pos must be [B, Lk] = [{batch}, {key.shape[2]}], got {tuple(k_pos.shape)}.")
    if _use_triton(query):
        from ..kernels.prefill import sparse_attention_triton

        with _on_device(query):
            return sparse_attention_triton(query, key, value, visible, terms, out=out)
    on_cpu = dispatch._backend == "auto" and query.device.type == "cpu"
    if on_cpu and k_pos is None and bool(streaming.all()) and terms.plain:
        # the CPU path for streaming heads: one fused SDPA call over window tiles (same rule)
        from ..kernels.window_sdpa import streaming_attention_sdpa

        def attend(q, k, v, terms=terms):
            return streaming_attention_sdpa(q, k, v, q_first=visible.q_first, kv_start=kv_start, sink=visible.sink,
                                            local=visible.local, scale=terms.scale, tile=tile)
    else:
        whole = visible.but(heads=None, groups=None, key_all_heads=False)

        def attend(q, k, v, terms=terms):
            return sparse_attention_reference(q, k, v, whole, terms, tile=tile)
    if heads is None:
        result = attend(query, key, value)
        return result if out is None else out.copy_(result)
    # PyTorch paths attend gathered heads; the result is scattered into ``out``
    picked = query.unflatten(1, (-1, groups)).index_select(1, heads).flatten(1, 2)
    if terms.sinks is not None:
        terms = terms.with_sinks(terms.sinks.view(-1, groups).index_select(0, heads).flatten())
    if visible.key_all_heads:
        key, value = key.index_select(1, heads), value.index_select(1, heads)
    out.unflatten(2, (-1, groups)).index_copy_(2, heads, attend(picked, key, value, terms).unflatten(2, (n, groups)))
    return out


def sampled_column_scores(query, key, visible: Visibility, terms: LogitTerms, *, rows, window) -> torch.Tensor:
    """SampleAttention stage 1 -> float32 [B, Hkv, Lk]; ``visible``'s q_first and kv_start; contract:
    ``kernels.reference.sampled_column_scores_reference``."""
    if _use_triton(query):
        from ..kernels.sampling import sampled_column_scores_triton

        with _on_device(query):
            return sampled_column_scores_triton(query, key, visible, terms, rows=rows, window=window)
    return sampled_column_scores_reference(query, key, visible, terms, rows=rows, window=window)


def stripe_attention(query, key, value, mask, terms: LogitTerms, *, tile: int = 256) -> torch.Tensor:
    """Attention on a StripeMask (window + column stripes) -> [B, Lq, Hq, D]; contract:
    ``kernels.reference.stripe_attention_reference``."""
    if _use_triton(query):
        from ..kernels.prefill import sparse_attention_triton

        visible = Visibility(mask.kv_start, local=1, q_first=key.shape[2] - query.shape[2])  # as the dense calls
        with _on_device(query):
            return sparse_attention_triton(query, key, value, visible, terms, stripe_mask=mask,
                                           whole_block_share=cost.WHOLE_BLOCK_SHARE)
    return stripe_attention_reference(query, key, value, mask, terms, tile=tile)


def read_fp8_pages(codes: torch.Tensor, scales: torch.Tensor, page_size: int, out: torch.Tensor) -> torch.Tensor:
    """Sealed FP8 pages (e4m3 codes [B, H, n x page_size, D], float32 scales [B, H, n]) read back into ``out`` [B, H,
    n x page_size, D], as a later prompt chunk attends to them: the one-pass Triton kernel on CUDA (fp16/bf16), the
    reference (``kernels.fp8.dequantize_pages``) elsewhere, 64K tokens at a time (its float32 work bounded)."""
    if _use_triton(out):
        with _on_device(out):
            return read_pages_triton(codes, scales, page_size, out)
    step = max(_READ_CHUNK // page_size, 1) * page_size
    for lo in range(0, codes.shape[2], step):
        hi = min(lo + step, codes.shape[2])
        dequantize_pages(codes[:, :, lo:hi], scales[:, :, lo // page_size : hi // page_size], page_size,
                         out=out[:, :, lo:hi])
    return out


_READ_CHUNK = 1 << 16
