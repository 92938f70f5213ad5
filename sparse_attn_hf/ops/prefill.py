"""Prefill attention ops: streaming + dense heads of one layer (``sparse_attention``), SampleAttention's two stages
(``sampled_column_scores``, ``stripe_attention``). Contracts: ``kernels.reference``."""

from __future__ import annotations

import torch

from .. import cost
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
    heads: torch.Tensor | None = None,
    groups: int = 1,
    key_all_heads: bool = False,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Dense + streaming attention of one layer -> [B, Lq, Hq, D].

    query [B, Hq, Lq, D] at slots ``q_first + i``; key/value [B, Hkv, Lk, D] at slots ``k_pos`` [B, Lk]
    (``None``: 0..Lk-1); kv_start [B]; streaming [Hkv] bool. Rule: ``kernels.reference``.

    ``heads`` (int64 [n]) restricts the call to the query heads of those KV-head groups of ``query``
    (Hq = ``groups`` x Hkv_total, query head ``h * groups + g`` belongs to KV head ``h``): key/value then hold
    the n heads in order, or every KV head when ``key_all_heads`` (head ``heads[i]`` is read, no copy);
    ``streaming`` is [n]; the result goes into those heads of ``out`` [B, Lq, Hq, D] (required), the other
    heads are left as they are. ``sinks`` (float [Hq], by query head of ``query``) and ``softcap``: the
    optional terms of ``kernels.reference``.
    """
    _check_attention_inputs(query, key, value, kv_start)
    batch, num_heads, q_len, head_dim = query.shape
    if heads is None:
        if num_heads % key.shape[1]:
            raise ValueError(f"the query heads ({num_heads}) must be a multiple of the KV heads ({key.shape[1]}).")
        n = key.shape[1]
    else:
        n = heads.shape[0]
        if (out is None or out.shape != (batch, q_len, num_heads, head_dim) or heads.ndim != 1
                or num_heads % groups or (not key_all_heads and key.shape[1] != n)
                or (key_all_heads and key.shape[1] * groups != num_heads)):
            raise ValueError("with heads=, pass out [B, Lq, Hq, D] and key/value holding those heads "
                             "(or every KV head with key_all_heads=True).")
    if streaming.shape != (n,):
        raise ValueError(f"streaming must be [{n}] (one flag per attended KV head), got {tuple(streaming.shape)}.")
    if k_pos is not None and tuple(k_pos.shape) != (batch, key.shape[2]):
        raise ValueError(f"k_pos must be [B, Lk] = [{batch}, {key.shape[2]}], got {tuple(k_pos.shape)}.")
    if _use_triton(query):
        from ..kernels.prefill import sparse_attention_triton

        with _on_device(query):
            return sparse_attention_triton(
                query, key, value, q_first=q_first, k_pos=k_pos, kv_start=kv_start, streaming=streaming,
                sink=sink, local=local, scale=scale, heads=heads, groups=groups, key_all_heads=key_all_heads,
                out=out, sinks=sinks, softcap=softcap,
            )
    terms = sinks is not None or softcap is not None
    on_cpu = dispatch._backend == "auto" and query.device.type == "cpu"
    if on_cpu and k_pos is None and bool(streaming.all()) and not terms:
        # the CPU path for streaming heads: one fused SDPA call over window tiles (same rule)
        from ..kernels.window_sdpa import streaming_attention_sdpa

        def attend(q, k, v, sinks=None):
            return streaming_attention_sdpa(q, k, v, q_first=q_first, kv_start=kv_start, sink=sink, local=local,
                                            scale=scale, tile=tile)
    else:
        q_pos = torch.arange(q_first, q_first + q_len, device=query.device).expand(batch, -1)
        k_pos = torch.arange(key.shape[2], device=query.device).expand(batch, -1) if k_pos is None else k_pos

        def attend(q, k, v, sinks=sinks):
            return sparse_attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, kv_start=kv_start,
                                              streaming=streaming, sink=sink, local=local, scale=scale, tile=tile,
                                              sinks=sinks, softcap=softcap)
    if heads is None:
        result = attend(query, key, value)
        return result if out is None else out.copy_(result)
    # PyTorch paths attend gathered heads; the result is scattered into ``out``
    picked = query.unflatten(1, (-1, groups)).index_select(1, heads).flatten(1, 2)
    if sinks is not None:
        sinks = sinks.view(-1, groups).index_select(0, heads).flatten()
    if key_all_heads:
        key, value = key.index_select(1, heads), value.index_select(1, heads)
    out.unflatten(2, (-1, groups)).index_copy_(2, heads, attend(picked, key, value, sinks).unflatten(2, (n, groups)))
    return out


def sampled_column_scores(query, key, *, rows, q_first: int, kv_start, window, scale: float, sinks=None,
                          softcap=None) -> torch.Tensor:
    """SampleAttention stage 1 -> float32 [B, Hkv, Lk]; contract:
    ``kernels.reference.sampled_column_scores_reference``."""
    common = dict(rows=rows, q_first=q_first, kv_start=kv_start, window=window, scale=scale, sinks=sinks,
                  softcap=softcap)
    if _use_triton(query):
        from ..kernels.sampling import sampled_column_scores_triton

        with _on_device(query):
            return sampled_column_scores_triton(query, key, **common)
    return sampled_column_scores_reference(query, key, **common)


def stripe_attention(query, key, value, *, mask, scale: float, tile: int = 256, sinks=None,
                     softcap=None) -> torch.Tensor:
    """Attention on a StripeMask (window + column stripes) -> [B, Lq, Hq, D]; contract:
    ``kernels.reference.stripe_attention_reference``."""
    if _use_triton(query):
        from ..kernels.prefill import sparse_attention_triton

        with _on_device(query):
            return sparse_attention_triton(
                query, key, value, q_first=key.shape[2] - query.shape[2], k_pos=None, kv_start=mask.kv_start,
                streaming=torch.zeros(key.shape[1], dtype=torch.bool, device=query.device), sink=0, local=1,
                scale=scale, stripe_mask=mask, whole_block_share=cost.WHOLE_BLOCK_SHARE, sinks=sinks, softcap=softcap)
    return stripe_attention_reference(query, key, value, mask=mask, scale=scale, tile=tile, sinks=sinks,
                                      softcap=softcap)
