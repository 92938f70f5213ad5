"""Readable PyTorch references. Each Triton kernel of this package implements one of these contracts.

Positions are *slots*: the index of a token in the (left-padded) sequence of its batch row, counting
every token the model has seen, pads included. Row ``b``'s real tokens start at slot ``kv_start[b]``.

Key ``j`` is visible to query ``i`` of row ``b`` in KV head ``h`` when all of these hold::

    kv_start[b] <= k_pos[b, j] <= q_pos[b, i]                      (a real token, causal)
    not streaming[h]                                                (dense head)
        or k_pos[b, j] - kv_start[b] < sink                         (one of the first real tokens)
        or q_pos[b, i] - k_pos[b, j] < local                        (inside the local window)

Causality is therefore aligned bottom-right for any Lq <= Lk when the positions are consecutive::

    keys     0 1 2 3 4 5 6 7          Lk = 8, Lq = 3: q_pos = [5, 6, 7]
    query 0  x x x x x x . .
    query 1  x x x x x x x .
    query 2  x x x x x x x x
"""

from __future__ import annotations

import torch


def visibility_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    kv_start: torch.Tensor,
    streaming: torch.Tensor,
    sink: int,
    local: int,
) -> torch.Tensor:
    """Bool [B, H, Lq, Lk]: which keys each query sees (see the module docstring).

    q_pos [B, Lq], k_pos [B, Lk] (int64; a negative key position marks an empty slot), kv_start [B],
    streaming [H] bool.
    """
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    start = kv_start[:, None, None, None]
    real_and_causal = (kp >= start) & (kp <= qp)
    in_window = ((kp - start) < sink) | ((qp - kp) < local)
    return real_and_causal & (in_window | ~streaming.view(1, -1, 1, 1))


def sparse_attention_reference(
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
    """Attention of dense and streaming heads, tile by tile over queries.

    Args:
        query: [B, Hq, Lq, D]; query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA; K/V are
            never repeated in memory).
        key, value: [B, Hkv, Lk, D].
        q_pos, k_pos, kv_start, streaming, sink, local: the visibility rule of this module.
        scale: softmax scale (usually D ** -0.5).
        tile: query rows per step; memory is O(B * Hq * tile * Lk). Each tile computes only the key
            columns that some query of the tile sees, so causal and window sparsity save work.

    Returns:
        [B, Lq, Hq, D] in the dtype of ``query``. Softmax runs in float32 (float64 for float64
        inputs). A query that sees no key (a pad) gets zeros.
    """
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    k = key.to(compute)
    v = value.to(compute)
    q = query.view(batch, num_kv_heads, groups, q_len, head_dim)
    out = torch.empty(batch, q_len, num_heads, head_dim, dtype=query.dtype, device=query.device)
    for start in range(0, q_len, tile):
        stop = min(start + tile, q_len)
        q_tile = q[:, :, :, start:stop].to(compute)
        mask = visibility_mask(q_pos[:, start:stop], k_pos, kv_start, streaming, sink, local)
        k_tile, v_tile = k, v
        columns = torch.nonzero(mask.any(dim=(0, 1, 2))).flatten()
        if columns.numel() < k_len:  # skip keys no query of the tile sees (future, outside the window)
            k_tile, v_tile = k.index_select(2, columns), v.index_select(2, columns)
            mask = mask.index_select(3, columns)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", q_tile, k_tile) * scale
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(compute).min)
        weights = torch.exp(scores - row_max)
        denom = weights.sum(dim=-1, keepdim=True)
        probs = weights / denom.clamp_min(torch.finfo(compute).tiny)
        tile_out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v_tile)
        out[:, start:stop] = tile_out.reshape(batch, num_heads, stop - start, head_dim).transpose(1, 2).to(query.dtype)
    return out


def block_sparse_attention_reference(query, key, value, *, mask, kv_start, scale) -> torch.Tensor:
    """Attention on the elements a :class:`~sparse_attn_hf.block_mask.BlockSparseMask` computes
    (one mask row list per KV head), with causality and left padding. Small shapes only: it builds
    the dense [Hkv, Lq, Lk] mask. Returns [B, Lq, Hq, D] like ``sparse_attention_reference``."""
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    allowed = mask.to_dense().to(query.device)  # [Hkv, Lq, Lk], causal included
    real = torch.arange(k_len, device=query.device)[None, :] >= kv_start[:, None]  # [B, Lk]
    visible = allowed[None] & real[:, None, None, :]
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.view(batch, num_kv_heads, groups, q_len, head_dim).to(compute)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q, key.to(compute)) * scale
    scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see nothing: zeros
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, value.to(compute))
    return out.reshape(batch, num_heads, q_len, head_dim).transpose(1, 2).to(query.dtype)
