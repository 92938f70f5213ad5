"""The attention function registered with Transformers: one call per layer and forward.

Two inputs reach it:

* ``key``/``value`` tensors [B, Hkv, Lk, D] holding every token of the sequence (no cache,
  ``use_cache=False``, or a ``DynamicCache``): the layer attends to them with its head labels.
* a :class:`~sparse_attn_hf.cache.PendingKV` from a :class:`SparseCache`: the new tokens are appended
  first, then dense heads attend to the paged cache and streaming heads to sink + ring buffer.

Either way the result is the same attention (the rule of ``kernels/reference.py``); only what is
stored differs.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import flash_attention_mask

from . import ops
from ._log import log_once
from .cache import LayerKV, PendingKV, SparseLayer
from .methods.sample_attention import sample_attention_mask, window_size
from .parallel import check_heads

ATTENTION_NAME = "sparse_attn_hf"

# The mask function: ``None`` when nothing is padded, else the 2D bool padding mask [B, Lkv].
sparse_attention_mask = flash_attention_mask


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers attention-interface function. Returns (output [B, Lq, Hq, D], None)."""
    state = getattr(module, "_sparse_attn_state", None)
    if state is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} is set but this module is not patched; "
            "call sparse_attn_hf.patch_model(model) (or model.set_attn_implementation('sdpa') to leave it)."
        )
    if dropout and module.training:
        raise ValueError("sparse_attn_hf is for inference: call model.eval() (attention dropout is not supported).")
    if query.shape[2] == 0:
        raise ValueError("empty input (0 tokens): pass at least one token.")
    batch, q_len = query.shape[0], query.shape[2]
    kv_heads = (key.key if isinstance(key, PendingKV) else key).shape[1]
    if kv_heads != state.streaming.shape[1] or query.shape[1] != kv_heads * module.num_key_value_groups:
        check_heads(state.heads, module, query.shape[1], kv_heads)  # raises: labels would land on wrong heads
    if isinstance(key, PendingKV):
        layer: SparseLayer = key.layer
        if layer.cache.owner is not state:
            raise ValueError(
                "this SparseCache was made for another model or an earlier patch: create SparseCache(model) "
                "for the model you call."
            )
        first = layer.seen
        kv_start = layer.cache.resolve_kv_start(attention_mask, layer, q_len)
        if q_len == 1:  # a decode step: page selection for dense heads, the decode window for streaming heads
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            step = layer.append_decode(key.key, key.value, kv_start, query)
            out = ops.paged_decode(query[:, :, 0], step, kv_start=kv_start, sink=layer.sink_size,
                                   local=layer.decode_local_size, scale=scale)
            return out.unsqueeze(1), None
        kv = layer.append(key.key, key.value, kv_start)
        dense_idx, stream_idx = layer.dense_idx, layer.stream_idx
    else:
        k_len = key.shape[2]
        if attention_mask is None and kwargs.get("position_ids") is not state.checked_positions:
            _check_positions(kwargs.get("position_ids"), k_len)  # once per forward, not per layer
            state.checked_positions = kwargs.get("position_ids")
        first = k_len - q_len
        kv_start = state.kv_start_for(attention_mask, batch, k_len, query.device)
        dense_idx, stream_idx = state.head_split(module.layer_idx, query.device)
        kv = LayerKV.split(key, value, dense_idx, stream_idx)
    settings = state.settings
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    common = dict(q_first=first, kv_start=kv_start, sink=settings.sink_size, local=settings.local_size,
                  scale=scale, tile=settings.query_tile)
    sample = _sample_settings(state, module.layer_idx, q_len, first + q_len)
    return _attend_by_kind(query, kv, dense_idx, stream_idx, common, sample), None


def _sample_settings(state, layer: int, q_len: int, k_len: int):
    """SampleAttention's settings for this call's dense heads, or None where they run dense."""
    settings = state.settings
    if settings.alpha >= 1.0 or k_len < settings.dense_below:
        return None
    if q_len < 2:
        log_once("sparse_attn_hf: SampleAttention needs at least 2 query rows to sample; one-token steps run dense.")
        return None
    if window_size(settings.rw, k_len) >= k_len:
        log_once(f"sparse_attn_hf: SampleAttention's window (rw={settings.rw}) covers a {k_len}-token sequence; "
                 "it runs dense.")
        return None
    return dict(state=state, layer=layer, alpha=settings.alpha, rw=settings.rw, r_row=settings.r_row,
                criterion=settings.cra_criterion, record=settings.record_masks)


def _check_positions(position_ids, k_len: int) -> None:
    """Without padding, the last position must be the last key: anything else is a cache we cannot read."""
    if position_ids is None:
        return
    last = int(position_ids[..., -1].max()) + 1
    if last != k_len:
        raise ValueError(
            f"the keys ({k_len}) do not end at the last position ({last}): a fixed-size or sliding cache "
            "(StaticCache) or custom position_ids. Use the default cache of generate(), a DynamicCache or a "
            "SparseCache, and positions 0..n-1."
        )


def _dense_heads(query, key, value, common, sample) -> torch.Tensor:
    """Dense heads: full causal attention, or SampleAttention's window + stripes when ``sample``."""
    streaming = torch.zeros(key.shape[1], dtype=torch.bool, device=query.device)
    if sample is None:
        return ops.sparse_attention(query, key, value, k_pos=None, streaming=streaming, **common)
    mask = sample_attention_mask(query, key, q_first=common["q_first"], kv_start=common["kv_start"],
                                 alpha=sample["alpha"], rw=sample["rw"], r_row=sample["r_row"], scale=common["scale"],
                                 criterion=sample["criterion"])
    if sample["record"]:
        sample["state"].masks[sample["layer"]] = mask
    return ops.stripe_attention(query, key, value, mask=mask, scale=common["scale"], tile=common["tile"])


def _attend_by_kind(query, kv: LayerKV, dense_idx, stream_idx, common, sample=None) -> torch.Tensor:
    """Dense heads and streaming heads attend to their own keys; outputs go back in head order."""
    batch, num_heads, q_len, head_dim = query.shape
    num_kv = len(dense_idx) + len(stream_idx)
    groups = num_heads // num_kv
    grouped = query.view(batch, num_kv, groups, q_len, head_dim)
    out = torch.empty(batch, q_len, num_kv, groups, head_dim, dtype=query.dtype, device=query.device)
    parts = (
        (dense_idx, kv.dense_key, kv.dense_value, None, False),
        (stream_idx, kv.stream_key, kv.stream_value, kv.stream_pos, True),
    )
    for heads, key, value, k_pos, is_streaming in parts:  # k_pos None: slots 0..n-1
        if not len(heads):
            continue
        def attend(q):
            if not is_streaming:
                return _dense_heads(q, key, value, common, sample)
            streaming = torch.ones(len(heads), dtype=torch.bool, device=query.device)
            return ops.sparse_attention(q, key, value, k_pos=k_pos, streaming=streaming, **common)

        if len(heads) == num_kv:  # one kind has every head: no gather, no scatter
            return attend(query)
        result = attend(grouped.index_select(1, heads).reshape(batch, len(heads) * groups, q_len, head_dim))
        out[:, :, heads] = result.view(batch, q_len, len(heads), groups, head_dim)
    return out.view(batch, q_len, num_heads, head_dim)


__all__ = ["ATTENTION_NAME", "sparse_attention_forward", "sparse_attention_mask"]
