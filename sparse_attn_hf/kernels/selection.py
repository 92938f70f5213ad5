"""Triton kernels of page selection: the bound of every page (stage 1) and the exact mass of a short list (stage 2).

Stage 1, contract ``reference.physical_page_scores_reference``: program (row, dense KV head, block of physical
pages) loads the group's query heads once and the key min/max of its logical pages, computes
``relu(q) . kmax - relu(-q) . kmin`` as two small matrix products, and reduces over query heads and over the
logical pages of each physical page.

Top-k, contract ``reference.top_pages_reference``: one program per (row, KV head) finds the k-th largest score by
a bisection on the scores' bit patterns (32 counting passes over the row), then writes the indices at or above it
in one pass (a running prefix sum places them).

Stage 2, contract ``reference.shortlist_pages_reference``: program (row, dense KV head, listed page) reads the
page's keys and keeps, per query head, the maximum and the sum of exponentials of its logits; one program per
(row, KV head) then normalises them over the list, writes the group's mass per listed page to a scratch row and
selects the pages of highest mass (the top-k above).

Every kernel returns at once on a step that reuses its selection, so that a CUDA graph replaying a decode step
costs a few empty launches there; the selection stays in its buffer.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8 import _first_recent_page
from .online_softmax import LOG2E, _logits

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit(do_not_specialize=["width"])  # the context's page count: no variant per divisibility of a length
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




@triton.jit
def _ordered(x):
    """float32 -> int64 keys in the same order (the sign-magnitude bit pattern made two's complement)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _count_at_least(SRC, width, threshold, BLOCK: tl.constexpr):
    """How many of SRC[0:width] are above -inf with a key >= threshold (int64)."""
    count = tl.zeros([], dtype=tl.int32)
    for start in range(0, width, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(SRC + offs, mask=offs < width, other=float("-inf"))
        count += tl.sum(((_ordered(x) >= threshold) & (x > float("-inf"))).to(tl.int32), 0)
    return count


@triton.jit
def _place(x, offs, k_th, ties, tied, placed, DST, MAP, HAS_MAP: tl.constexpr):
    """Write the entries of one block above the k-th largest key (and the first ``ties`` equal to it, counting
    ``tied`` from earlier blocks) to DST, after ``placed`` earlier ones; returns the new (tied, placed)."""
    key = _ordered(x)
    real = x > float("-inf")
    equal = (real & (key == k_th)).to(tl.int32)
    take = (real & (key > k_th)) | ((equal == 1) & (tied + tl.cumsum(equal, 0) - equal < ties))
    take_i = take.to(tl.int32)
    slot = placed + tl.cumsum(take_i, 0) - take_i
    if HAS_MAP:
        value = tl.load(MAP + offs, mask=take, other=-1)
    else:
        value = offs
    tl.store(DST + slot, value.to(tl.int32), mask=take)
    return tied + tl.sum(equal, 0), placed + tl.sum(take_i, 0)


@triton.jit
def _top_k_row(SRC, width, k, DST, MAP, HAS_MAP: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """DST[0:k] = the indices (or MAP[index]) of the k largest values of SRC[0:width] above -inf, unordered (ties
    by index), then -1. ONE_BLOCK (width <= BLOCK): the row stays in registers for the 32 counting passes."""
    lo = tl.full([], -(2**31), tl.int64)  # the k-th largest key is in [lo, hi]
    hi = tl.full([], 2**31 - 1, tl.int64)
    tied = tl.zeros([], dtype=tl.int32)
    placed = tl.zeros([], dtype=tl.int32)
    if ONE_BLOCK:
        offs = tl.arange(0, BLOCK)
        x = tl.load(SRC + offs, mask=offs < width, other=float("-inf"))
        key = _ordered(x)
        real = x > float("-inf")
        wanted = tl.minimum(k, tl.sum(real.to(tl.int32), 0))
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            enough = tl.sum((real & (key >= mid)).to(tl.int32), 0) >= wanted
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        ties = wanted - tl.sum((real & (key > lo)).to(tl.int32), 0)
        tied, placed = _place(x, offs, lo, ties, tied, placed, DST, MAP, HAS_MAP)
    else:
        wanted = tl.minimum(k, _count_at_least(SRC, width, -(2**40), BLOCK))
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            enough = _count_at_least(SRC, width, mid, BLOCK) >= wanted
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        ties = wanted - _count_at_least(SRC, width, lo + 1, BLOCK)
        for start in range(0, width, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(SRC + offs, mask=offs < width, other=float("-inf"))
            tied, placed = _place(x, offs, lo, ties, tied, placed, DST, MAP, HAS_MAP)
    for start in range(0, k, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(DST + offs, tl.full([BLOCK], -1, tl.int32), mask=(offs >= wanted) & (offs < k))


@triton.jit(do_not_specialize=["RESELECT", "width", "k"])  # one compile per ROW_BLOCKS bucket (the warm-up)
def _top_pages_kernel(SCORES, RESELECT, OUT, width, k, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    if tl.load(RESELECT) == 0:  # the step reuses the selection already in OUT
        return
    row = tl.program_id(0)
    _top_k_row(SCORES + row * width, width, k, OUT + row * k, OUT, False, BLOCK, ONE_BLOCK)


def _block(width: int, buckets: bool = True) -> tuple[int, bool, int]:
    """(block, the row in one block, warps) of a top-k over rows of ``width``: the smallest of ``ROW_BLOCKS`` that
    holds the row (a few compiled variants cover every context length), else passes over blocks of 1024.
    ``buckets`` False: the next power of two (a row whose width the settings fix, as the short list's)."""
    if buckets:
        block = next((block for block in ROW_BLOCKS if width <= block), None)
    else:
        block = max(16, triton.next_power_of_2(width))
        block = block if block <= ROW_IN_REGISTERS else None
    if block is not None:
        return block, True, 4 if block <= 2048 else 8
    return 1024, False, 4


ROW_IN_REGISTERS = 8192  # longer rows (contexts over 512K tokens in pages of 64) are read again in each pass
ROW_BLOCKS = (256, 1024, 4096, ROW_IN_REGISTERS)  # one compile each (patch_model's warm-up), not one per power of 2


def compile_top_pages(max_width: int, device: torch.device) -> None:
    """Compile ``top_pages_triton`` for every row bucket of ``_block`` up to rows of ``max_width`` (the warm-up: a
    first long prompt then compiles nothing)."""
    reselect = torch.ones(1, dtype=torch.int32, device=device)
    out = torch.empty(1, 1, 2, dtype=torch.int32, device=device)
    for width in (*ROW_BLOCKS, ROW_IN_REGISTERS + 1):
        top_pages_triton(torch.zeros(1, 1, width, dtype=torch.float32, device=device), out=out, reselect=reselect)
        if width >= max_width:
            return


def top_pages_triton(scores: torch.Tensor, *, out: torch.Tensor, reselect: torch.Tensor) -> torch.Tensor:
    """The ``out.shape[2]`` best pages of each row of ``scores`` [B, Hd, width] (float32, contiguous) into ``out``
    (int32, contiguous) when ``reselect`` (int32 [1], on the device) is set."""
    batch, heads, width = scores.shape
    block, one_block, warps = _block(width)
    _top_pages_kernel[(batch * heads,)](scores, reselect, out, width, out.shape[2], BLOCK=block, ONE_BLOCK=one_block,
                                        num_warps=warps)
    return out


@triton.jit(do_not_specialize=["width"])
def _shortlist_page_kernel(
    Q, K, BOUND, LIST, KV_START, SEEN, RESELECT, M_OUT, L_OUT, KS, RK,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_sb, stride_sh, stride_sn,
    stride_rb, stride_rh, stride_rn, stride_rd,
    num_heads, width, n_list, scale_log2, softcap_log2,
    GROUPS: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr, RECENT: tl.constexpr,
):
    """Per query head: the maximum logit of one listed page and the sum of exp2(logit - maximum) (log2 units)."""
    if tl.load(RESELECT) == 0:
        return
    pid_bh = tl.program_id(0)
    j = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    page = tl.load(LIST + pid_bh * n_list + j).to(tl.int32)  # -1: no page
    listed = tl.load(BOUND + pid_bh * width + page, mask=page >= 0, other=float("-inf")) > float("-inf")
    end = tl.where(listed, tl.load(SEEN).to(tl.int32), 0)  # a page listed with a bound of -inf: no real key
    g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + g[:, None] * stride_qg + offs_d[None, :] * stride_qd,
                mask=(g[:, None] < GROUPS) & d_ok[None, :], other=0.0)
    slots = page * PAGE + tl.arange(0, PAGE)
    real = (slots >= tl.load(KV_START + b).to(tl.int32)) & (slots < end)
    if FP8:  # a sealed page: e4m3 codes, exact in the query's dtype, its scale joining the logits'; a newer one: ring
        if page >= _first_recent_page(tl.load(SEEN).to(tl.int32), PAGE, RECENT):
            ring = (page * PAGE) % RECENT + tl.arange(0, PAGE)
            k = tl.load(RK + b * stride_rb + h * stride_rh + ring[None, :] * stride_rn + offs_d[:, None] * stride_rd,
                        mask=real[None, :] & d_ok[:, None], other=0.0)
            k_scale = tl.full([], 1.0, tl.float32)
        else:
            k = tl.load(K + b * stride_kb + h * stride_kh + slots[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=real[None, :] & d_ok[:, None], other=0.0).to(Q.dtype.element_ty)
            k_scale = tl.load(KS + b * stride_sb + h * stride_sh + page * stride_sn, mask=page >= 0, other=1.0)
        scale_log2 = scale_log2 * k_scale
    else:
        k = tl.load(K + b * stride_kb + h * stride_kh + slots[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=real[None, :] & d_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    logits = _logits(q, k, scale_log2, softcap_log2, PRECISION)
    logits = tl.where(real[None, :], logits, float("-inf"))
    m = tl.max(logits, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.exp2(logits - m_safe[:, None]), 1)
    out = (pid_bh * n_list + j) * G_PAD + g
    tl.store(M_OUT + out, m)
    tl.store(L_OUT + out, l)


@triton.jit(do_not_specialize=["width"])
def _shortlist_select_kernel(
    BOUND, LIST, RESELECT, M_IN, L_IN, MASS, OUT, width, n_list, k,
    GROUPS: tl.constexpr, G_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """The group's attention mass per listed page, normalised over the list (the sink page +inf), then the k
    pages of highest mass."""
    if tl.load(RESELECT) == 0:
        return
    pid_bh = tl.program_id(0)
    j = tl.arange(0, N_PAD)
    g = tl.arange(0, G_PAD)
    j_ok = j < n_list
    at = (pid_bh * n_list + j[:, None]) * G_PAD + g[None, :]
    m = tl.load(M_IN + at, mask=j_ok[:, None], other=float("-inf"))
    l = tl.load(L_IN + at, mask=j_ok[:, None], other=0.0)
    top = tl.max(m, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    share = l * tl.exp2(m - top[None, :])  # [N, G]
    total = tl.sum(share, 0)
    share = tl.where((g < GROUPS)[None, :] & (total > 0)[None, :], share / tl.where(total > 0, total, 1.0)[None, :], 0.0)
    mass = tl.sum(share, 1)
    page = tl.load(LIST + pid_bh * n_list + j, mask=j_ok, other=-1).to(tl.int32)
    bound = tl.load(BOUND + pid_bh * width + page, mask=j_ok & (page >= 0), other=float("-inf"))
    ranked = tl.where(bound == float("inf"), bound, tl.where(bound > float("-inf"), mass, float("-inf")))
    tl.store(MASS + pid_bh * n_list + j, ranked, mask=j_ok)
    tl.debug_barrier()  # the row of masses is written before it is ranked
    _top_k_row(MASS + pid_bh * n_list, n_list, k, OUT + pid_bh * k, LIST + pid_bh * n_list, True, BLOCK, ONE_BLOCK)


def shortlist_pages_triton(query, keys, bound, shortlist, *, kv_start, seen: torch.Tensor, out: torch.Tensor,
                           reselect: torch.Tensor, page_size: int, scale: float,
                           softcap: float | None = None, key_scale: torch.Tensor | None = None,
                           recent: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 2 into ``out`` (int32 [B, Hd, k], contiguous) when ``reselect`` (int32 [1], on the device) is set;
    ``bound`` [B, Hd, width] float32 and ``shortlist`` int32 [B, Hd, n] contiguous (-1: no page); ``seen`` int32 [1]
    on the device; FP8 pages: ``keys`` e4m3 codes, ``key_scale`` [B, Hd, pages] their scales, ``recent`` the ring
    of the newest tokens (``kernels.fp8``). Fixed launch arguments for a given cache: a CUDA graph can replay it."""
    batch, heads, groups, head_dim = query.shape
    width, n_list = bound.shape[2], shortlist.shape[2]
    g_pad = max(16, triton.next_power_of_2(groups))
    m_part = torch.empty(batch * heads * n_list * g_pad, dtype=torch.float32, device=query.device)
    l_part = torch.empty_like(m_part)
    mass = torch.empty(batch * heads * n_list, dtype=torch.float32, device=query.device)
    _shortlist_page_kernel[(batch * heads, n_list)](
        query, keys, bound, shortlist, kv_start, seen, reselect, m_part, l_part,
        key_scale if key_scale is not None else bound, recent if recent is not None else keys,
        *query.stride(), *keys.stride(), *(key_scale if key_scale is not None else bound).stride(),
        *(recent if recent is not None else keys).stride(), heads, width, n_list, scale * LOG2E, (softcap or 0.0) * LOG2E,
        GROUPS=groups, G_PAD=g_pad, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        PAGE=page_size, UPCAST=_INTERPRETING and query.dtype == torch.bfloat16,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", FP8=key_scale is not None,
        RECENT=recent.shape[2] if recent is not None else page_size, num_warps=4,
    )
    n_pad = max(16, triton.next_power_of_2(n_list))
    block, one_block, _ = _block(n_list, buckets=False)  # fixed by the settings: compiled once
    _shortlist_select_kernel[(batch * heads,)](
        bound, shortlist, reselect, m_part, l_part, mass, out, width, n_list, out.shape[2],
        GROUPS=groups, G_PAD=g_pad, N_PAD=n_pad, BLOCK=block, ONE_BLOCK=one_block,
        num_warps=4 if n_pad * g_pad <= 4096 else 8,
    )
    return out
