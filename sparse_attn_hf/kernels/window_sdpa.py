"""Streaming heads through PyTorch SDPA, one call over all query tiles: the CPU path.

Same contract as ``reference.sparse_attention_reference`` with every head streaming and consecutive key slots
(0..Lk-1). Queries are cut into tiles of ``tile`` rows; a tile sees at most the row's ``sink`` first real keys
and the ``tile + local - 1`` keys ending at its last query. Those keys are gathered per tile (about
``(sink + tile + local) / tile`` times the keys of a head, not Lq x Lk), and one SDPA call attends every tile,
row and head to its own keys under the exact visibility mask. On a CPU this runs the fused SDPA kernel where
the reference runs a dozen small ops per tile.
"""

from __future__ import annotations

import torch


def streaming_attention_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, q_first: int,
                             kv_start: torch.Tensor, sink: int, local: int, scale: float,
                             tile: int = 256) -> torch.Tensor:
    """query [B, Hq, Lq, D] at slots ``q_first + i``; key/value [B, Hkv, Lk, D] at slots 0..Lk-1; every head
    streams. Returns [B, Lq, Hq, D]; a query that sees no key gets zeros."""
    batch, num_heads, q_len, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv
    device = query.device
    tile = max(1, min(tile, q_len))
    n_tiles = -(-q_len // tile)
    span = tile + local - 1  # window keys a tile can see
    # key slots of each (row, tile): the row's sink slots, then the tile's window slots
    sink_slots = kv_start[:, None] + torch.arange(sink, device=device)[None, :]  # [B, S]
    tile_last = q_first + torch.arange(1, n_tiles + 1, device=device) * tile - 1  # [T]
    window_slots = tile_last[:, None] - span + 1 + torch.arange(span, device=device)[None, :]  # [T, W]
    slots = torch.cat([sink_slots[:, None, :].expand(-1, n_tiles, -1),
                       window_slots[None].expand(batch, -1, -1)], dim=2)  # [B, T, S + W]
    in_sink = torch.arange(sink + span, device=device) < sink
    # query slots of each tile (padded past Lq), and the rule of reference.visibility_mask; window keys that
    # are also sink keys are left to the sink part (each key counts once)
    q_slots = q_first + torch.arange(n_tiles * tile, device=device).view(n_tiles, tile)  # [T, R]
    start = kv_start[:, None, None, None]
    qp, kp = q_slots[None, :, :, None], slots[:, :, None, :]
    rel = kp - start
    visible = (rel >= 0) & (kp <= qp) & (kp < k_len) & torch.where(in_sink, rel < sink, (rel >= sink) & (qp - kp < local))
    gather = slots.clamp(0, k_len - 1).reshape(batch, 1, -1, 1).expand(-1, num_kv, -1, head_dim)
    keys = key.gather(2, gather).view(batch, num_kv, n_tiles, sink + span, head_dim)
    values = value.gather(2, gather).view(batch, num_kv, n_tiles, sink + span, head_dim)
    q = query.view(batch, num_kv, groups, q_len, head_dim)
    if n_tiles * tile != q_len:
        q = torch.nn.functional.pad(q, (0, 0, 0, n_tiles * tile - q_len))
    # [B, Hkv, T, G * R, D]: the group's query heads of a tile share its keys
    q = q.view(batch, num_kv, groups, n_tiles, tile, head_dim).permute(0, 1, 3, 2, 4, 5)
    q = q.reshape(batch * num_kv * n_tiles, 1, groups * tile, head_dim)
    mask = visible[:, None, :, None].expand(-1, num_kv, -1, groups, -1, -1)
    mask = mask.reshape(batch * num_kv * n_tiles, 1, groups * tile, sink + span)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, keys.reshape(-1, 1, sink + span, head_dim), values.reshape(-1, 1, sink + span, head_dim),
        attn_mask=mask, scale=scale)
    if bool((kv_start > q_first).any()):  # rows of pads see no key: zeros, not SDPA's NaN (kv_start on the host)
        out = torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=device))
    out = out.view(batch, num_kv, n_tiles, groups, tile, head_dim).permute(0, 2, 4, 1, 3, 5)
    return out.reshape(batch, n_tiles * tile, num_heads, head_dim)[:, :q_len]
