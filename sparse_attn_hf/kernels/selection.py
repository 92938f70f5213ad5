"""Triton kernel: page-selection scores of all dense heads and rows in one launch.

Same contract as ``reference.physical_page_scores_reference``. Program (row, dense KV head, block of
physical pages) loads the group's query heads once and the key min/max of its logical pages, computes
``relu(q) . kmax - relu(-q) . kmin`` as two small matrix products, and reduces over query heads and
over the logical pages of each physical page. The top-k that follows is ``torch.topk``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scores_kernel(
    Q, KMIN, KMAX, KV_START, SEEN, RESELECT, OUT,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_nb, stride_nh, stride_nl, stride_nd,
    stride_xb, stride_xh, stride_xl, stride_xd,
    num_heads, width,
    GROUPS: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, LOGICAL: tl.constexpr, PER_PAGE: tl.constexpr, BLOCK_P: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    if tl.load(RESELECT) == 0:  # the step reuses the scores already in OUT
        return
    # candidates: the pages before the tail (the newest page), scored; the rest of the row -inf
    num_pages = tl.cdiv(tl.load(SEEN).to(tl.int32), PAGE) - 1
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + g[:, None] * stride_qg + offs_d[None, :] * stride_qd,
                mask=(g[:, None] < GROUPS) & d_ok[None, :], other=0.0).to(tl.float32)
    q_pos = tl.maximum(q, 0.0)
    q_neg = tl.maximum(-q, 0.0)
    if not UPCAST:
        q_pos = q_pos.to(KMAX.dtype.element_ty)
        q_neg = q_neg.to(KMAX.dtype.element_ty)
    start = tl.load(KV_START + b).to(tl.int32)
    first_real = tl.minimum(start // PAGE, num_pages - 1)  # the sink page (-1 when there is no candidate)
    BLOCK_L: tl.constexpr = BLOCK_P * PER_PAGE
    logical = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    in_range = logical < num_pages * PER_PAGE
    base_n = KMIN + b * stride_nb + h * stride_nh
    base_x = KMAX + b * stride_xb + h * stride_xh
    kmin = tl.load(base_n + logical[None, :] * stride_nl + offs_d[:, None] * stride_nd,
                   mask=in_range[None, :] & d_ok[:, None], other=0.0)
    kmax = tl.load(base_x + logical[None, :] * stride_xl + offs_d[:, None] * stride_xd,
                   mask=in_range[None, :] & d_ok[:, None], other=0.0)
    if UPCAST:
        kmin = kmin.to(tl.float32)
        kmax = kmax.to(tl.float32)
    scores = tl.dot(q_pos, kmax, input_precision=PRECISION) - tl.dot(q_neg, kmin, input_precision=PRECISION)
    scores = tl.where((g < GROUPS)[:, None], scores, float("-inf"))
    per_logical = tl.max(scores, 0)
    has_real = (logical + 1) * LOGICAL > start
    per_logical = tl.where(has_real & in_range, per_logical, float("-inf"))  # also clears NaN of empty pages
    per_page = tl.max(tl.reshape(per_logical, [BLOCK_P, PER_PAGE]), 1)
    pages = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    per_page = tl.where(pages == first_real, float("inf"), per_page)
    per_page = tl.where(pages < num_pages, per_page, float("-inf"))
    tl.store(OUT + pid_bh * width + pages, per_page, mask=pages < width)


def physical_page_scores_triton(query, key_min, key_max, *, kv_start, seen: torch.Tensor, out: torch.Tensor,
                                reselect: torch.Tensor, page_size: int, logical_page_size: int) -> torch.Tensor:
    """Scores into ``out`` [B, Hd, width] (contiguous) when ``reselect`` (int32 [1], on the device) is set;
    ``seen`` int32 [1] on the device. Every launch argument is fixed for a given cache: a CUDA graph can
    replay it."""
    batch, heads, groups, head_dim = query.shape
    per_page = page_size // logical_page_size
    block_p = max(1, 64 // per_page)  # 64 logical pages per program
    width = out.shape[2]
    _scores_kernel[(batch * heads, triton.cdiv(width, block_p))](
        query, key_min, key_max, kv_start, seen, reselect, out,
        *query.stride(), *key_min.stride(), *key_max.stride(),
        heads, width,
        GROUPS=groups, G_PAD=max(16, triton.next_power_of_2(groups)), HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), PAGE=page_size, LOGICAL=logical_page_size,
        PER_PAGE=per_page, BLOCK_P=block_p,
        UPCAST=query.dtype == torch.float32 or (_INTERPRETING and query.dtype == torch.bfloat16),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # [G, BLOCK_L] scores: exact in fp32
        num_warps=4,
    )
    return out
