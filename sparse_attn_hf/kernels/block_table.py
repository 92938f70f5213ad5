"""Triton kernel: one decode step of every request of a continuous batch, read through the manager's block table.

Same contract as ``reference.block_table_decode_reference``. Transformers' continuous-batching manager keeps every
layer's keys and values in pages of ``P`` tokens (``k_pages`` [num_pages, P, Hkv, D], one row of the block table
per request: the page holding its tokens ``i * P .. i * P + P - 1`` at column ``i``). Its decode fast path hands
the attention the step's new key and value and leaves the write to the kernel, as flash's ``flash_attn_with_kvcache``
does. Here, program (request, KV head, split):

* reads the tokens its head kind sees, in tiles of ``BLOCK_N`` tokens gathered through the block table: a dense head
  every stored token, or, where its request selects (``layout.BlockTableSelection``), the tiles of its listed pages
  (a -1 page's masked whole) then the tail's from ``tail_first``; a streaming head the sink keys (the first ``sink``
  tokens the window does not hold) and the decode window (the last ``window`` tokens, the new one included), never
  the pages between them;
* split 0 adds the new token from registers and writes it into its page (no other program reads that slot: the
  stored tokens end before it), so no step reads a token another program writes;
* writes a partial softmax that ``decode._combine_kernel`` merges (learned sinks there).

The lengths come from ``cu_seq_lens_k`` on the device (a request of length 0, the manager's padding, reads and
writes nothing and gives zeros), and the grid depends only on the tensors' shapes: a CUDA graph can replay it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import _INTERPRETING, _combine_kernel, _num_splits
from .layout import BlockTableSelection, LogitTerms
from .online_softmax import LOG2E, _logits, _softmax_step, _tanh


@triton.jit(do_not_specialize=["sink", "window", "num_splits", "num_sel"])
def _block_table_split_kernel(
    Q, KN, VN, KC, VC, TABLE, CU_K, HEAD_KIND, SEL_PAGES, TAIL_FIRST, M_OUT, L_OUT, ACC_OUT,
    stride_qr, stride_qh, stride_qd,
    stride_knr, stride_knh, stride_knd,
    stride_vnr, stride_vnh, stride_vnd,
    stride_kcp, stride_kcn, stride_kch, stride_kcd,
    stride_vcp, stride_vcn, stride_vch, stride_vcd,
    stride_tr, stride_tb,
    stride_sr, stride_sh, stride_ss,
    sink, window, num_kv_heads, num_splits, num_sel, scale_log2, softcap_log2,
    GROUPS: tl.constexpr, G_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_SELECTION: tl.constexpr,
    SEL_PAGE: tl.constexpr,
):
    pid = tl.program_id(0)  # request * num_kv_heads + KV head
    split = tl.program_id(1)
    r = pid // num_kv_heads
    h = pid % num_kv_heads
    g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    head = h * GROUPS + g
    row_ok = g < GROUPS
    q = tl.load(Q + r * stride_qr + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    length = tl.load(CU_K + r + 1) - tl.load(CU_K + r)  # the new token included
    past = tl.maximum(length - 1, 0)  # tokens already in the pages
    kind = tl.load(HEAD_KIND + h)
    if kind == 0:  # dense: every stored token, one range
        first_end = past
        second = past
    else:  # streaming: the sink keys the window does not hold, then the window's stored tokens
        second = tl.maximum(length - window, 0)
        first_end = tl.minimum(sink, second)
    first_tiles = tl.cdiv(first_end, BLOCK_N)
    if HAS_SELECTION:  # a dense head of a selecting request: its listed pages' tiles first, then the tail
        sel_tiles = SEL_PAGE // BLOCK_N  # tiles a page
        tail_first = tl.load(TAIL_FIRST + r).to(tl.int32)
        selecting = (kind == 0) & (tail_first >= 0)
        first_tiles = tl.where(selecting, num_sel * sel_tiles, first_tiles)
        second = tl.where(selecting, tail_first * SEL_PAGE, second)
    second_tile = second // BLOCK_N
    total = first_tiles + tl.maximum(tl.cdiv(past, BLOCK_N) - second_tile, 0)
    per = tl.cdiv(total, num_splits)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for e in range(split * per, tl.minimum(split * per + per, total)):
        if e < first_tiles:
            pos = e * BLOCK_N + offs_n
            if HAS_SELECTION:
                if selecting:  # tile e % sel_tiles of listed page e // sel_tiles; page -1: past the stored tokens
                    listed = tl.load(SEL_PAGES + r * stride_sr + h * stride_sh + (e // sel_tiles) * stride_ss)
                    start = listed.to(tl.int32) * SEL_PAGE + (e % sel_tiles) * BLOCK_N
                    pos = tl.where(listed >= 0, start, first_end) + offs_n
            visible = pos < first_end
        else:
            pos = (second_tile + e - first_tiles) * BLOCK_N + offs_n
            visible = (pos >= second) & (pos < past)
        # int64: the manager's pool spans every layer's pages, past 2**31 elements on a large GPU
        entry = tl.load(TABLE + r * stride_tr + (pos // PAGE) * stride_tb, mask=visible, other=0).to(tl.int64)
        slot = pos % PAGE
        k = tl.load(KC + entry[None, :] * stride_kcp + slot[None, :] * stride_kcn + h * stride_kch
                    + offs_d[:, None] * stride_kcd, mask=visible[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(VC + entry[:, None] * stride_vcp + slot[:, None] * stride_vcn + h * stride_vch
                    + offs_d[None, :] * stride_vcd, mask=visible[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = _logits(q, k, scale_log2, softcap_log2, PRECISION)
        scores = tl.where(visible[None, :], scores, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, scores, v, UPCAST, PRECISION, True)
    if (split == 0) & (length > 0):  # the new token: from registers, then stored in its page
        kn = tl.load(KN + r * stride_knr + h * stride_knh + offs_d * stride_knd, mask=d_ok, other=0.0)
        vn = tl.load(VN + r * stride_vnr + h * stride_vnh + offs_d * stride_vnd, mask=d_ok, other=0.0)
        score = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale_log2  # [G_PAD]
        if softcap_log2 > 0:
            score = softcap_log2 * _tanh(score / softcap_log2)
        m_new = tl.maximum(m_i, score)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(score - m_new)
        acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]
        l_i = l_i * alpha + p
        m_i = m_new
        entry = tl.load(TABLE + r * stride_tr + (past // PAGE) * stride_tb).to(tl.int64)
        tl.store(KC + entry * stride_kcp + (past % PAGE) * stride_kcn + h * stride_kch + offs_d * stride_kcd,
                 kn.to(KC.dtype.element_ty), mask=d_ok)
        tl.store(VC + entry * stride_vcp + (past % PAGE) * stride_vcn + h * stride_vch + offs_d * stride_vcd,
                 vn.to(VC.dtype.element_ty), mask=d_ok)
    out = (r * num_kv_heads * GROUPS + head) * num_splits + split  # [R, Hq, splits], as the combine reads it
    tl.store(M_OUT + out, m_i, mask=row_ok)
    tl.store(L_OUT + out, l_i, mask=row_ok)
    tl.store(ACC_OUT + out[:, None] * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


def block_table_decode_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_pages: torch.Tensor,
                              v_pages: torch.Tensor, block_table: torch.Tensor, cu_k: torch.Tensor,
                              head_kind: torch.Tensor, *, sink: int, window: int, terms: LogitTerms,
                              selection: BlockTableSelection | None = None,
                              num_splits: int | None = None) -> torch.Tensor:
    """query [R, Hq, D], key/value (the step's new token) [R, Hkv, D] -> [R, Hq, D]; the new token is written into
    ``k_pages``/``v_pages`` [num_pages, P, Hkv, D] at its request's slot. With a ``selection``, a tile never spans
    two of its pages (``BLOCK_N`` divides ``selection.page_size``)."""
    rows, num_heads, head_dim = query.shape
    num_kv = key.shape[1]
    groups = num_heads // num_kv
    page = k_pages.shape[1]
    block_n = min(64, max(16, triton.next_power_of_2(page)))
    if selection is not None:
        block_n = min(block_n, selection.page_size & -selection.page_size)
    sel = selection or BlockTableSelection(head_kind[None, None], head_kind, 0)  # HAS_SELECTION off: never read
    tiles = triton.cdiv(block_table.shape[1] * page, block_n)  # the most a request can hold
    # decode's rule (two waves, at least two entries a split) with an entry of two tiles: four tiles a split at least
    splits = num_splits or _num_splits(rows * num_kv, triton.cdiv(tiles, 2), query.device)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    m_part = torch.empty(rows, num_heads, splits, dtype=torch.float32, device=query.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(rows, num_heads, splits, d_pad, dtype=torch.float32, device=query.device)
    _block_table_split_kernel[(rows * num_kv, splits)](
        query, key, value, k_pages, v_pages, block_table, cu_k, head_kind, sel.pages, sel.tail_first, m_part, l_part,
        acc_part, *query.stride(), *key.stride(), *value.stride(), *k_pages.stride(), *v_pages.stride(),
        *block_table.stride(), *sel.pages.stride(), sink, window, num_kv, splits, sel.pages.shape[2],
        terms.scale * LOG2E, (terms.softcap or 0.0) * LOG2E,
        GROUPS=groups, G_PAD=max(16, triton.next_power_of_2(groups)), PAGE=page, BLOCK_N=block_n,
        HEAD_DIM=head_dim, D_PAD=d_pad, UPCAST=_INTERPRETING and query.dtype == torch.bfloat16,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", HAS_SELECTION=selection is not None,
        SEL_PAGE=sel.page_size, num_warps=4, num_stages=2,
    )
    out = torch.empty_like(query)
    sinks = terms.sinks
    _combine_kernel[(rows * num_heads,)](
        m_part, l_part, acc_part, out, sinks if sinks is not None else m_part, *out.stride(), num_heads, splits,
        S_PAD=max(2, triton.next_power_of_2(splits)), HEAD_DIM=head_dim, D_PAD=d_pad, HAS_SINKS=sinks is not None,
        num_warps=4,
    )
    return out
