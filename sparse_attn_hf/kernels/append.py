"""Triton kernel: store one decode token of every KV head of a layer in a SparseCache, in one launch.

The token's slot is read from the device (``SEEN`` holds the tokens stored once this one is, so the slot is
``SEEN - 1``): no per-step host value, so a CUDA graph can replay the launch. Dense heads: K/V into the paged
buffer at that slot and the token's key into its logical page's min/max
(unless the token is padding). Streaming heads: K/V into the ring at ``slot % ring_size`` (and the ring's
slot table), and into the sink buffer when the token is one of its row's first ``sink`` real tokens.
FP8 pages (``kernels.fp8``): a dense head's token goes to the ring of recent tokens (at ``slot % RECENT``); the first
token of a page first seals the ring's oldest page, whose place it takes: quantized in registers (the codes
PyTorch's ``quantize_pages`` gives) into the e4m3 buffers, its scale stored.
Its contract is ``kernels.reference.append_token_reference`` (tests compare the two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import MIN_SCALE, _quantize_page


@triton.jit
def _seal(T, D, S, stride_tn, stride_td, stride_dn, stride_dd, at, first, offs_d, d_ok, PAGE: tl.constexpr,
          MIN_SCALE: tl.constexpr):
    """The page of one head at ring index ``at`` (its tokens in the ring T) quantized into the e4m3 buffer D at
    slots ``first ..`` and its scale into S."""
    offs_p = tl.arange(0, PAGE)
    page = tl.load(T + (at + offs_p[:, None]) * stride_tn + offs_d[None, :] * stride_td, mask=d_ok[None, :],
                   other=0.0).to(tl.float32)
    codes, scale = _quantize_page(page, MIN_SCALE)
    tl.store(D + (first + offs_p[:, None]) * stride_dn + offs_d[None, :] * stride_dd, codes, mask=d_ok[None, :])
    tl.store(S + first // PAGE, scale)


@triton.jit
def _append_kernel(
    K, V, DK, DV, KMIN, KMAX, SK, SV, SPOS, RK, RV, RPOS, KV_START, HEAD_KIND, HEAD_SLOT, SEEN, KS, VS, TK, TV,
    stride_kb, stride_kh, stride_kd, stride_vb, stride_vh, stride_vd,
    stride_db, stride_dh, stride_dn, stride_dd,
    stride_mb, stride_mh, stride_ml, stride_md,
    stride_sb, stride_sh, stride_sn, stride_sd, stride_spb, stride_spn,
    stride_rb, stride_rh, stride_rn, stride_rd,
    stride_scb, stride_sch, stride_tb, stride_th, stride_tn, stride_td,
    num_kv_heads, sink, ring_size,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, LOGICAL: tl.constexpr, FP8: tl.constexpr, PAGE: tl.constexpr,
    RECENT: tl.constexpr, MIN_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    h = pid % num_kv_heads
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_d * stride_kd, mask=d_ok)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_d * stride_vd, mask=d_ok)
    kind = tl.load(HEAD_KIND + h)
    slot = tl.load(HEAD_SLOT + h)
    start = tl.load(KV_START + b).to(tl.int32)
    slot_new = tl.load(SEEN).to(tl.int32) - 1
    if kind == 0:
        if FP8:
            ring_at = b * stride_tb + slot * stride_th
            index = slot_new % RECENT
            if (slot_new % PAGE == 0) & (slot_new >= RECENT):  # the ring's oldest page leaves it: sealed first
                head = b * stride_db + slot * stride_dh
                scales = b * stride_scb + slot * stride_sch
                _seal(TK + ring_at, DK + head, KS + scales, stride_tn, stride_td, stride_dn, stride_dd, index,
                      slot_new - RECENT, offs_d, d_ok, PAGE, MIN_SCALE)
                _seal(TV + ring_at, DV + head, VS + scales, stride_tn, stride_td, stride_dn, stride_dd, index,
                      slot_new - RECENT, offs_d, d_ok, PAGE, MIN_SCALE)
                tl.debug_barrier()  # the page is read before the new token takes its first place
            at = ring_at + index * stride_tn + offs_d * stride_td
            tl.store(TK + at, k, mask=d_ok)
            tl.store(TV + at, v, mask=d_ok)
        else:
            row = b * stride_db + slot * stride_dh + slot_new * stride_dn + offs_d * stride_dd
            tl.store(DK + row, k, mask=d_ok)
            tl.store(DV + row, v, mask=d_ok)
        if slot_new >= start:  # statistics cover real tokens only
            page = b * stride_mb + slot * stride_mh + (slot_new // LOGICAL) * stride_ml + offs_d * stride_md
            tl.store(KMIN + page, tl.minimum(tl.load(KMIN + page, mask=d_ok), k), mask=d_ok)
            tl.store(KMAX + page, tl.maximum(tl.load(KMAX + page, mask=d_ok), k), mask=d_ok)
    else:
        index = slot_new % ring_size
        ring = b * stride_rb + slot * stride_rh + index * stride_rn + offs_d * stride_rd
        tl.store(RK + ring, k, mask=d_ok)
        tl.store(RV + ring, v, mask=d_ok)
        tl.store(RPOS + index, slot_new.to(tl.int64))  # the same value from every program
        rel = slot_new - start
        if (rel >= 0) & (rel < sink):
            at = b * stride_sb + slot * stride_sh + rel * stride_sn + offs_d * stride_sd
            tl.store(SK + at, k, mask=d_ok)
            tl.store(SV + at, v, mask=d_ok)
            tl.store(SPOS + b * stride_spb + rel * stride_spn, slot_new.to(tl.int64))


def append_token_triton(key: torch.Tensor, value: torch.Tensor, tensors: dict, *, seen: torch.Tensor,
                        kv_start: torch.Tensor, head_kind: torch.Tensor, head_slot: torch.Tensor, sink: int,
                        logical_page_size: int) -> None:
    """key/value [B, Hkv, 1, D]; ``tensors`` the layer's buffers (``dense_*``, ``key_min``/``key_max``,
    ``sink_*``, ``ring_*``), with capacity for the slot already ensured; ``seen`` int32 [1] on the device,
    the tokens stored once this one is."""
    batch, num_kv, _, head_dim = key.shape
    k, v = key[:, :, 0], value[:, :, 0]
    spare = key[:, :1]  # stands in for a kind the layer lacks (never written: no head of that kind)
    dk, dv = tensors.get("dense_key", spare), tensors.get("dense_value", spare)
    kmin, kmax = tensors.get("key_min", spare), tensors.get("key_max", spare)
    sk, sv = tensors.get("sink_key", spare), tensors.get("sink_value", spare)
    rk, rv = tensors.get("ring_key", spare), tensors.get("ring_value", spare)
    pos_spare = kv_start.view(batch, 1)
    spos, rpos = tensors.get("sink_pos", pos_spare), tensors.get("ring_pos", pos_spare[0])
    if sk.shape[2] == 0:  # sink 0: zero-size buffer, never written
        sk = sv = spare
        spos = pos_spare
    fp8 = tensors.get("key_scale") is not None
    if fp8:
        ks, vs, tk, tv = tensors["key_scale"], tensors["value_scale"], tensors["recent_key"], tensors["recent_value"]
        if ks.stride() != vs.stride() or tk.stride() != tv.stride() or dk.stride() != dv.stride():
            raise ValueError("FP8 pages: keys and values (codes, scales, rings) must share one layout.")
    else:  # stand-ins, never read
        ks = vs = pos_spare
        tk = tv = spare
    _append_kernel[(batch * num_kv,)](
        k, v, dk, dv, kmin, kmax, sk, sv, spos, rk, rv, rpos, kv_start, head_kind, head_slot, seen, ks, vs, tk, tv,
        *k.stride(), *v.stride(), *dk.stride(), *kmin.stride(), *sk.stride(), *spos.stride(), *rk.stride(),
        *(ks.stride()[:2] if fp8 else (0, 0)), *(tk.stride() if fp8 else (0, 0, 0, 0)),
        num_kv, sink, rk.shape[2],
        HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)), LOGICAL=logical_page_size,
        FP8=fp8, PAGE=dk.shape[2] // ks.shape[2] if fp8 else 16, RECENT=tk.shape[2] if fp8 else 16,
        MIN_SCALE=MIN_SCALE, num_warps=1 if not fp8 else 4,
    )
