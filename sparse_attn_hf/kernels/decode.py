"""Triton kernel: one decode step of one layer over a SparseCache (all heads, all rows, one launch + a combine).

Same contract as ``reference.paged_decode_reference``. Split-K (flash-decoding): program (row, KV head,
split) walks its share of the head's *entries* and writes a partial softmax (max, sum, weighted
values); a second small kernel combines the splits. Entries are 64-token pages:

* dense head: the selected pages (``DecodeKV.pages``, -1 skipped), then the tail pages from
  ``tail_first`` to the newest; a tail from page 0 (the context fits the budget) is everything, and
  no selected page is read;
* streaming head: the blocks of the sink buffer, then the blocks of the ring buffer.

FP8 pages (``DecodeKV.key_scale`` set, ``kernels.fp8``): a sealed page's e4m3 codes are read as the query's dtype
(exact) and its scales multiply its scores and its weighted values (scalars per page and head); the newest pages
are read from the ring of recent tokens, in the model's dtype.

The query heads of a GQA group are the rows of one program, so every K/V page is loaded once per group.

The token count and the tail are read from the device (``DecodeKV.step``); the page table has a fixed
width and the grid depends only on the cache's sizes, so a CUDA graph can replay a step.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8 import _first_recent_page
from .layout import STEP_SEEN, STEP_TAIL, DecodeKV, LogitTerms, Visibility
from .online_softmax import LOG2E, _logits, _softmax_step

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # bf16 dots are wrong in the interpreter


@triton.jit
def _page_update(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap_log2, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Online-softmax step for one page: k [D, PAGE], v [PAGE, D], visible [PAGE]."""
    if UPCAST:
        k = k.to(tl.float32)
    scores = _logits(q, k, scale_log2, softcap_log2, PRECISION)
    scores = tl.where(visible[None, :], scores, float("-inf"))
    return _softmax_step(acc, m_i, l_i, scores, v, UPCAST, PRECISION, True)


@triton.jit
def _scaled_page_update(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap_log2, k_scale, v_scale,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``_page_update`` for a page stored as codes times scales: k's scale joins the logits' scale, v's multiplies
    the page's weighted values."""
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    scores = _logits(q, k, scale_log2 * k_scale, softcap_log2, PRECISION)
    scores = tl.where(visible[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    if UPCAST:
        pv = tl.dot(p, v, input_precision=PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc * alpha[:, None] + pv * v_scale, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit(do_not_specialize=["n_sel", "sink_cap", "ring_cap", "num_splits"])
def _decode_split_kernel(
    Q, DK, DV, PAGES, SK, SV, SPOS, RK, RV, RPOS, KV_START, HEAD_KIND, HEAD_SLOT, STEP, M_OUT, L_OUT, ACC_OUT,
    KS, VS, TK, TV,
    stride_qb, stride_qh, stride_qd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_pb, stride_ph, stride_pn,
    stride_skb, stride_skh, stride_skn, stride_skd,
    stride_svb, stride_svh, stride_svn, stride_svd,
    stride_spb, stride_spn,
    stride_rkb, stride_rkh, stride_rkn, stride_rkd,
    stride_rvb, stride_rvh, stride_rvn, stride_rvd,
    stride_sclb, stride_sclh, stride_scln, stride_tb, stride_th, stride_tn, stride_td,
    n_sel, sink_cap, ring_cap, sink, local, num_kv_heads, num_splits, scale_log2, softcap_log2,
    GROUPS: tl.constexpr, G_PAD: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, STEP_SEEN: tl.constexpr,
    STEP_TAIL: tl.constexpr, FP8: tl.constexpr, RECENT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_p = tl.arange(0, PAGE)
    d_ok = offs_d < HEAD_DIM
    head = h * GROUPS + g
    row_ok = g < GROUPS
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kind = tl.load(HEAD_KIND + h)
    slot = tl.load(HEAD_SLOT + h)
    start = tl.load(KV_START + b).to(tl.int32)
    seen = tl.load(STEP + STEP_SEEN).to(tl.int32)
    query_slot = seen - 1
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    if kind == 0:  # dense head: selected pages, then the tail
        DK += b * stride_dkb + slot * stride_dkh
        DV += b * stride_dvb + slot * stride_dvh
        if FP8:
            KS += b * stride_sclb + slot * stride_sclh
            VS += b * stride_sclb + slot * stride_sclh
            TK += b * stride_tb + slot * stride_th
            TV += b * stride_tb + slot * stride_th
        tail_first = tl.load(STEP + STEP_TAIL).to(tl.int32)
        n_sel = tl.where(tail_first == 0, 0, n_sel)  # tail 0: every page, no selection
        open_first = _first_recent_page(seen, PAGE, RECENT)  # FP8: pages from here are in the ring
        total = n_sel + tl.cdiv(seen, PAGE) - tail_first
        per = tl.cdiv(total, num_splits)
        for e in range(split * per, tl.minimum(split * per + per, total)):
            if e < n_sel:
                page = tl.load(PAGES + b * stride_pb + slot * stride_ph + e * stride_pn)
            else:
                page = tail_first + e - n_sel
            offs = page * PAGE + offs_p
            visible = (offs >= start) & (offs < seen) & (offs >= 0)  # page -1: nothing
            if FP8:
                if page >= open_first:  # one of the newest pages: the ring, in the model's dtype
                    ring = (page * PAGE) % RECENT + offs_p
                    k = tl.load(TK + ring[None, :] * stride_tn + offs_d[:, None] * stride_td,
                                mask=visible[None, :] & d_ok[:, None], other=0.0)
                    v = tl.load(TV + ring[:, None] * stride_tn + offs_d[None, :] * stride_td,
                                mask=visible[:, None] & d_ok[None, :], other=0.0)
                    k_scale = tl.full([], 1.0, tl.float32)
                    v_scale = tl.full([], 1.0, tl.float32)
                else:  # a sealed page: e4m3 codes, exact in the query's dtype, and the page's scales
                    k = tl.load(DK + offs[None, :] * stride_dkn + offs_d[:, None] * stride_dkd,
                                mask=visible[None, :] & d_ok[:, None], other=0.0).to(Q.dtype.element_ty)
                    v = tl.load(DV + offs[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                                mask=visible[:, None] & d_ok[None, :], other=0.0).to(Q.dtype.element_ty)
                    k_scale = tl.load(KS + page * stride_scln, mask=page >= 0, other=1.0)
                    v_scale = tl.load(VS + page * stride_scln, mask=page >= 0, other=1.0)
                acc, m_i, l_i = _scaled_page_update(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap_log2,
                                                    k_scale, v_scale, UPCAST, PRECISION)
            else:
                k = tl.load(DK + offs[None, :] * stride_dkn + offs_d[:, None] * stride_dkd,
                            mask=visible[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(DV + offs[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                            mask=visible[:, None] & d_ok[None, :], other=0.0)
                acc, m_i, l_i = _page_update(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap_log2, UPCAST,
                                             PRECISION)
    else:  # streaming head: sink blocks, then ring blocks
        SK += b * stride_skb + slot * stride_skh
        SV += b * stride_svb + slot * stride_svh
        RK += b * stride_rkb + slot * stride_rkh
        RV += b * stride_rvb + slot * stride_rvh
        sink_blocks = tl.cdiv(sink_cap, PAGE)
        total = sink_blocks + tl.cdiv(ring_cap, PAGE)
        per = tl.cdiv(total, num_splits)
        for e in range(split * per, tl.minimum(split * per + per, total)):
            if e < sink_blocks:
                idx = e * PAGE + offs_p
                pos = tl.load(SPOS + b * stride_spb + idx * stride_spn, mask=idx < sink_cap, other=-1)
                visible = pos >= 0
                k = tl.load(SK + idx[None, :] * stride_skn + offs_d[:, None] * stride_skd,
                            mask=visible[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(SV + idx[:, None] * stride_svn + offs_d[None, :] * stride_svd,
                            mask=visible[:, None] & d_ok[None, :], other=0.0)
            else:
                idx = (e - sink_blocks) * PAGE + offs_p
                pos = tl.load(RPOS + idx, mask=idx < ring_cap, other=-1)
                visible = (pos >= start) & (pos - start >= sink) & (query_slot - pos < local)
                k = tl.load(RK + idx[None, :] * stride_rkn + offs_d[:, None] * stride_rkd,
                            mask=visible[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(RV + idx[:, None] * stride_rvn + offs_d[None, :] * stride_rvd,
                            mask=visible[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i = _page_update(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap_log2, UPCAST, PRECISION)
    out = (b * num_kv_heads * GROUPS + head) * num_splits + split  # [B, Hq, splits] layout
    tl.store(M_OUT + out, m_i, mask=row_ok)
    tl.store(L_OUT + out, l_i, mask=row_ok)
    tl.store(ACC_OUT + out[:, None] * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(M_IN, L_IN, ACC_IN, O, SINKS, stride_ob, stride_oh, stride_od, num_heads, num_splits,
                    S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_SINKS: tl.constexpr):
    pid = tl.program_id(0)  # b * num_heads + head
    b = pid // num_heads
    head = pid % num_heads
    s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = s < num_splits
    m = tl.load(M_IN + pid * num_splits + s, mask=s_ok, other=float("-inf"))
    l = tl.load(L_IN + pid * num_splits + s, mask=s_ok, other=0.0)
    acc = tl.load(ACC_IN + (pid * num_splits + s)[:, None] * D_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_all = tl.max(m, 0)
    if HAS_SINKS:  # the head's learned sink (natural units): one more logit, no value
        sink_log2 = tl.load(SINKS + head).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_all, sink_log2)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_all)  # splits that saw nothing: m = -inf, weight 0
    denom = tl.sum(w * l, 0)
    if HAS_SINKS:
        denom += tl.exp2(sink_log2 - m_all)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + b * stride_ob + head * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _num_splits(batch_heads: int, entries: int, device: torch.device) -> int:
    """Enough programs for about two waves of the GPU, at least two pages per split."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, batch_heads), triton.cdiv(entries, 2)))


def paged_decode_triton(query: torch.Tensor, kv: DecodeKV, visible: Visibility, terms: LogitTerms, *,
                        num_splits: int | None = None) -> torch.Tensor:
    """Launch the split and combine kernels. query [B, Hq, D] -> [B, Hq, D]. The grid and every argument
    depend on the cache's sizes only (``kv.step`` carries the step's counters), so CUDA graphs can replay it."""
    kv_start, sink, local = visible.kv_start, visible.sink, visible.local
    scale, softcap, sinks = terms.scale, terms.softcap, terms.sinks
    batch, num_heads, head_dim = query.shape
    num_kv = kv.head_kind.shape[0]
    groups = num_heads // num_kv
    page = kv.page_size
    entries = 1
    dk, dv, pages = kv.dense_key, kv.dense_value, kv.pages
    sk, sv, spos, rk, rv, rpos = kv.sink_key, kv.sink_value, kv.sink_pos, kv.ring_key, kv.ring_value, kv.ring_pos
    if dk is not None:
        if pages is None or pages.numel() == 0:  # no selection: every page the buffer holds may be read
            pages = torch.full((batch, dk.shape[1], 1), -1, dtype=torch.int32, device=query.device)
            n_sel = 0
            entries = max(entries, triton.cdiv(dk.shape[2], page))
        else:
            n_sel = pages.shape[2]
            # pages a step visits: the selection + a tail of one or two pages (a page may start while a selection
            # is reused), or the whole context while it fits the budget (at most n_sel + 1 pages); sets the split
            entries = max(entries, n_sel + 2)
    else:
        dk = dv = query[:, :1, None]
        pages = torch.zeros(1, 1, 1, dtype=torch.int32, device=query.device)
        n_sel = 0
    if sk is not None:
        sink_cap, ring_cap = sk.shape[2], rk.shape[2]
        entries = max(entries, triton.cdiv(sink_cap, page) + triton.cdiv(ring_cap, page))
        if sink_cap == 0:  # a zero-size buffer still needs valid strides
            sk = sv = query[:, :1, None]
            spos = torch.full((batch, 1), -1, dtype=torch.long, device=query.device)
    else:
        sink_cap = ring_cap = 0
        sk = sv = rk = rv = query[:, :1, None]
        spos = torch.full((batch, 1), -1, dtype=torch.long, device=query.device)
        rpos = spos[0]
    fp8 = kv.key_scale is not None and kv.dense_key is not None
    if fp8:
        ks, vs, tk, tv = kv.key_scale, kv.value_scale, kv.recent_key, kv.recent_value
        if ks.stride() != vs.stride() or tk.stride() != tv.stride():
            raise ValueError("FP8 pages: the key and value scales (and rings) must share one layout.")
    else:  # stand-ins, never read
        ks = vs = pages
        tk = tv = dk
    scale_strides = ks.stride() if fp8 else (0, 0, 0)
    recent_strides = tk.stride() if fp8 else (0, 0, 0, 0)
    splits = num_splits or _num_splits(batch * num_kv, entries, query.device)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    m_part = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=query.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(batch, num_heads, splits, d_pad, dtype=torch.float32, device=query.device)
    _decode_split_kernel[(batch * num_kv, splits)](
        query, dk, dv, pages, sk, sv, spos, rk, rv, rpos, kv_start, kv.head_kind, kv.head_slot, kv.step,
        m_part, l_part, acc_part, ks, vs, tk, tv,
        *query.stride(), *dk.stride(), *dv.stride(), *pages.stride(), *sk.stride(), *sv.stride(),
        *spos.stride(), *rk.stride(), *rv.stride(), *scale_strides, *recent_strides,
        n_sel, sink_cap, ring_cap, sink, local, num_kv, splits, scale * LOG2E, (softcap or 0.0) * LOG2E,
        GROUPS=groups, G_PAD=max(16, triton.next_power_of_2(groups)), PAGE=page, HEAD_DIM=head_dim, D_PAD=d_pad,
        UPCAST=_INTERPRETING and query.dtype == torch.bfloat16,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 (tests): exact, not tf32
        STEP_SEEN=STEP_SEEN, STEP_TAIL=STEP_TAIL, FP8=fp8, RECENT=tk.shape[2] if fp8 else page, num_warps=4,
        num_stages=2,
    )
    out = torch.empty_like(query)
    _combine_kernel[(batch * num_heads,)](
        m_part, l_part, acc_part, out, sinks if sinks is not None else m_part, *out.stride(), num_heads, splits,
        S_PAD=max(2, triton.next_power_of_2(splits)), HEAD_DIM=head_dim, D_PAD=d_pad, HAS_SINKS=sinks is not None,
        num_warps=4,
    )
    return out
