"""Triton kernels: SampleAttention stage 1 (column scores of sampled query rows), in O(L) memory.

Same contract as ``reference.sampled_column_scores_reference``. Two passes, never the [rows, L] matrix:

1. ``_row_stats_kernel``: program (tile of sampled rows, row x KV head) runs the online softmax of its
   rows (the GQA group's query heads packed as rows) over all visible keys: the running max and sum.
2. ``_column_kernel``: program (key block, row x KV head) walks the sampled rows that can see the block,
   recomputes their probabilities with the stored max and sum, keeps those outside each row's window,
   and sums them per key.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import LogitTerms, Visibility
from .online_softmax import LOG2E, _logits, _merge_sink

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_rows(Q, ROWS, b, h, tile, stride_qb, stride_qh, stride_qm, stride_qd, n_rows, q_first,
               GROUPS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
               D_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """The tile's sampled rows x group heads: (q [BLOCK_R * G_PAD, D], slot of each row, row ok)."""
    offs_m = tl.arange(0, BLOCK_R * G_PAD)
    offs_d = tl.arange(0, D_PAD)
    r = tile * BLOCK_R + offs_m // G_PAD
    g = offs_m % G_PAD
    ok = (r < n_rows) & (g < GROUPS)
    qi = tl.load(ROWS + r, mask=r < n_rows, other=0)
    q = tl.load(Q + b * stride_qb + (h * GROUPS + g)[:, None] * stride_qh + qi[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, q_first + qi, ok


@triton.jit(do_not_specialize=["n_rows", "q_first", "k_len"])
def _row_stats_kernel(
    Q, K, ROWS, KV_START, M_OUT, L_OUT,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    n_rows, q_first, k_len, num_kv_heads, scale_log2, softcap_log2, SINKS,
    GROUPS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    q, qpos, ok = _load_rows(Q, ROWS, b, h, tile, stride_qb, stride_qh, stride_qm, stride_qd, n_rows, q_first,
                             GROUPS, G_PAD, BLOCK_R, HEAD_DIM, D_PAD, UPCAST)
    start = tl.load(KV_START + b).to(tl.int32)
    offs_d = tl.arange(0, D_PAD)
    m_i = tl.full([BLOCK_R * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R * G_PAD], tl.float32)
    end = tl.minimum(tl.max(tl.where(ok, qpos, 0)) + 1, k_len)
    for n0 in range((start // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=(offs_n[None, :] < k_len) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = _logits(q, k, scale_log2, softcap_log2, PRECISION)
        visible = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] >= start) & ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    if HAS_SINKS:  # a row's sink takes its share of the denominator (its mass on keys is what it leaves)
        g = tl.arange(0, BLOCK_R * G_PAD) % G_PAD
        sink_log2 = tl.load(SINKS + h * GROUPS + g, mask=g < GROUPS, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        acc = tl.zeros([BLOCK_R * G_PAD, 1], tl.float32)
        acc, m_i, l_i = _merge_sink(acc, m_i, l_i, tl.where(ok, sink_log2, float("-inf")))
    out = tile * BLOCK_R * G_PAD + tl.arange(0, BLOCK_R * G_PAD)
    tl.store(M_OUT + pid_bh * tl.num_programs(0) * BLOCK_R * G_PAD + out, m_i)
    tl.store(L_OUT + pid_bh * tl.num_programs(0) * BLOCK_R * G_PAD + out, l_i)


@triton.jit(do_not_specialize=["n_rows", "q_first", "k_len", "num_tiles"])
def _column_kernel(
    Q, K, ROWS, KV_START, WINDOW, FIRST_TILE, M_IN, L_IN, OUT,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    n_rows, q_first, k_len, num_kv_heads, num_tiles, scale_log2, softcap_log2,
    GROUPS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    kb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    start = tl.load(KV_START + b).to(tl.int32)
    window = tl.load(WINDOW + pid_bh).to(tl.int32)
    offs_d = tl.arange(0, D_PAD)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=(offs_n[None, :] < k_len) & (offs_d[:, None] < HEAD_DIM), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    col = tl.zeros([BLOCK_N], tl.float32)
    rows_per_tile: tl.constexpr = BLOCK_R * G_PAD
    for tile in range(tl.load(FIRST_TILE + kb), num_tiles):  # tiles whose last row can see the block
        q, qpos, ok = _load_rows(Q, ROWS, b, h, tile, stride_qb, stride_qh, stride_qm, stride_qd, n_rows, q_first,
                                 GROUPS, G_PAD, BLOCK_R, HEAD_DIM, D_PAD, UPCAST)
        stat = pid_bh * num_tiles * rows_per_tile + tile * rows_per_tile + tl.arange(0, rows_per_tile)
        m = tl.load(M_IN + stat)
        l = tl.load(L_IN + stat)
        s = _logits(q, k, scale_log2, softcap_log2, PRECISION)
        keep = ((offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] >= start) & ok[:, None]
                & ((qpos[:, None] - offs_n[None, :]) >= window) & (l > 0.0)[:, None])
        p = tl.exp2(s - tl.where(m == float("-inf"), 0.0, m)[:, None]) / tl.where(l > 0.0, l, 1.0)[:, None]
        col += tl.sum(tl.where(keep, p, 0.0), 0)
    tl.store(OUT + pid_bh * k_len + offs_n, col, mask=offs_n < k_len)


CONFIG = {"block_n": 128, "packed_rows": 128, "num_warps": 4}  # the best of 8 on an H100 (benchmarks/NOTES.md)


def sampled_column_scores_triton(query, key, visible: Visibility, terms: LogitTerms, *, rows, window,
                                 block_n: int | None = None, packed_rows: int | None = None,
                                 num_warps: int | None = None) -> torch.Tensor:
    """Launch the two sampling kernels (row statistics, then column sums); contract:
    ``kernels.reference.sampled_column_scores_reference``."""
    q_first, kv_start = visible.q_first, visible.kv_start
    scale, softcap, sinks = terms.scale, terms.softcap, terms.sinks
    batch, num_heads, _, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv
    g_pad = triton.next_power_of_2(groups)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    wide = max(1, d_pad // 128)  # head_dim 256 (Gemma 3): half the tiles, or they overflow shared memory (256 KiB)
    block_n = block_n or CONFIG["block_n"] // wide
    num_warps = num_warps or CONFIG["num_warps"]
    block_r = max(1, (packed_rows or CONFIG["packed_rows"] // wide) // g_pad)  # sampled rows x group heads
    n_rows = rows.numel()
    rows = rows.to(torch.int32).contiguous()
    num_tiles = triton.cdiv(n_rows, block_r)
    common = dict(GROUPS=groups, G_PAD=g_pad, BLOCK_R=block_r, BLOCK_N=block_n, HEAD_DIM=head_dim, D_PAD=d_pad,
                  UPCAST=_INTERPRETING and query.dtype == torch.bfloat16,
                  PRECISION="ieee" if query.dtype == torch.float32 else "tf32")
    m = torch.empty(batch * num_kv, num_tiles * block_r * g_pad, dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    _row_stats_kernel[(num_tiles, batch * num_kv)](
        query, key, rows, kv_start, m, l, *query.stride(), *key.stride(), n_rows, q_first, k_len, num_kv,
        scale * LOG2E, (softcap or 0.0) * LOG2E, sinks if sinks is not None else m, **common,
        HAS_SINKS=sinks is not None, num_warps=num_warps)
    # the first row tile whose last row reaches each key block (rows are sorted)
    last_of_tile = q_first + rows[torch.clamp((torch.arange(num_tiles, device=rows.device) + 1) * block_r, max=n_rows) - 1]
    block_start = torch.arange(triton.cdiv(k_len, block_n), device=rows.device, dtype=torch.int32) * block_n
    first_tile = torch.searchsorted(last_of_tile.to(torch.int32).contiguous(), block_start).to(torch.int32)
    out = torch.empty(batch, num_kv, k_len, dtype=torch.float32, device=query.device)
    _column_kernel[(triton.cdiv(k_len, block_n), batch * num_kv)](
        query, key, rows, kv_start, window.reshape(-1).contiguous(), first_tile, m, l, out,
        *query.stride(), *key.stride(), n_rows, q_first, k_len, num_kv, num_tiles, scale * LOG2E,
        (softcap or 0.0) * LOG2E, **common, num_warps=num_warps)
    return out
