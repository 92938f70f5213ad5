"""Triton kernel: unified block-sparse attention of one layer (all heads, all rows, one launch).

Same contract as ``reference.sparse_attention_reference`` (see its module docstring for the rule),
with one restriction: query slots are consecutive, ``q_pos[b, i] = q_first + i`` for every row.

Each program owns ``BLOCK_Q`` query positions of one (batch row, KV head) and all ``GROUPS`` query
heads of that KV head: its ``BLOCK_Q * GROUPS`` rows share every K/V block it loads (GQA without
repeated K/V). The key blocks it visits are computed from integers, outside the inner loop:

* dense head: from the row's first real slot to the diagonal;
* streaming head: the blocks holding the sink, then the blocks of the local window;
* ``k_pos`` given (keys not consecutive, e.g. sink + ring buffer): every block, masked by position;
* a :class:`~sparse_attn_hf.block_mask.BlockSparseMask`: the key blocks listed for the program's
  (KV head, query block), any pattern (random blocks, SampleAttention's window + stripes).

Only visible keys enter the softmax (token-exact masks); a block is never visited twice. Soft-capping
(``softcap``) and learned sinks (``sinks``) follow ``kernels.reference``. On Hopper and
newer GPUs K/V tiles arrive by bulk tensor copies (TMA descriptors) when the layout allows, else by
pointer loads (measured in benchmarks/NOTES.md: TMA 4-5% faster on an H100).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..block_mask import BlockSparseMask
from .layout import LogitTerms, Visibility
from .online_softmax import LOG2E, _logits, _merge_sink, _softmax_step

# Triton's CPU interpreter computes tl.dot on bfloat16 operands wrongly (triton 3.9: errors of 1e10 on
# a 16x16 product), so under TRITON_INTERPRET=1 bfloat16 dots run in float32. The GPU path never does.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, n0, K, V, KD, VD, KPOS, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
    qpos, start, is_stream, sink, local, k_len, scale_log2, softcap_log2, offs_d,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, CONSECUTIVE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
):
    """One key block of the online softmax. MASKED=False: every key of the block is visible to every
    row (interior blocks), so no position arithmetic and no bounds checks."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_range = offs_n < k_len
    d_ok = offs_d < HEAD_DIM
    k_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if TMA:  # bulk tensor copy; rows past k_len arrive as zeros
        k = KD.load([n0, 0]).T
    elif MASKED:
        k = tl.load(k_ptrs, mask=in_range[None, :] & d_ok[:, None], other=0.0)
    elif HEAD_DIM == D_PAD:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    scores = _logits(q, k, scale_log2, softcap_log2, PRECISION)
    if MASKED:
        if CONSECUTIVE:
            kpos = offs_n
        else:
            kpos = tl.load(KPOS + offs_n * stride_pn, mask=in_range, other=-1)
        visible = (kpos[None, :] >= start) & (kpos[None, :] <= qpos[:, None]) & in_range[None, :]
        in_window = ((kpos[None, :] - start) < sink) | ((qpos[:, None] - kpos[None, :]) < local)
        visible = visible & (in_window | (is_stream == 0))
        scores = tl.where(visible, scores, float("-inf"))
    if TMA:
        v = VD.load([n0, 0])
    elif MASKED:
        v = tl.load(v_ptrs, mask=in_range[:, None] & d_ok[None, :], other=0.0)
    elif HEAD_DIM == D_PAD:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    return _softmax_step(acc, m_i, l_i, scores, v, UPCAST, PRECISION, MASKED)


@triton.jit
def _attend_columns(
    acc, m_i, l_i, q, cols, col_ok, K, V, stride_kn, stride_kd, stride_vn, stride_vd, qpos, start, window,
    scale_log2, softcap_log2, offs_d, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gathered key columns (SampleAttention stripes): each is visible to the rows it lies outside the
    local window of (the window's keys are visited by the window loop: no key counts twice)."""
    d_ok = offs_d < HEAD_DIM
    k = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=col_ok[None, :] & d_ok[:, None],
                other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    scores = _logits(q, k, scale_log2, softcap_log2, PRECISION)
    visible = col_ok[None, :] & (cols[None, :] >= start) & ((qpos[:, None] - cols[None, :]) >= window)
    scores = tl.where(visible, scores, float("-inf"))
    v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=col_ok[:, None] & d_ok[None, :],
                other=0.0)
    return _softmax_step(acc, m_i, l_i, scores, v, UPCAST, PRECISION, True)


@triton.jit
def _attend_stripe_block(
    acc, m_i, l_i, q, n0, K, V, KD, VD, FLAGS, stride_kn, stride_kd, stride_vn, stride_vd, qpos, start, window,
    k_len, scale_log2, softcap_log2, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """A key block dense with stripes, visited whole (bulk loads, no gather): only its stripe columns
    (``FLAGS``) count, and each only for the rows it lies outside the window of, as in ``_attend_columns``."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_range = offs_n < k_len
    d_ok = offs_d < HEAD_DIM
    flag = tl.load(FLAGS + offs_n, mask=in_range, other=0) != 0
    if TMA:
        k = KD.load([n0, 0]).T
    else:
        k = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=in_range[None, :] & d_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    scores = _logits(q, k, scale_log2, softcap_log2, PRECISION)
    visible = flag[None, :] & (offs_n[None, :] >= start) & ((qpos[:, None] - offs_n[None, :]) >= window)
    scores = tl.where(visible, scores, float("-inf"))
    if TMA:
        v = VD.load([n0, 0])
    else:
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=in_range[:, None] & d_ok[None, :], other=0.0)
    return _softmax_step(acc, m_i, l_i, scores, v, UPCAST, PRECISION, True)


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, lo, hi, K, V, KD, VD, KPOS, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
    qpos, start, is_stream, sink, local, k_len, scale_log2, softcap_log2, offs_d,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, CONSECUTIVE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
):
    for n0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, n0, K, V, KD, VD, KPOS, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
            qpos, start, is_stream, sink, local, k_len, scale_log2, softcap_log2, offs_d,
            HEAD_DIM, D_PAD, BLOCK_N, CONSECUTIVE, UPCAST, PRECISION, MASKED, TMA)
    return acc, m_i, l_i


# lengths change from call to call (chunks, decode steps): no specialization on them, one compiled variant
@triton.jit(do_not_specialize=["q_len", "k_len", "q_first", "num_mask_q_blocks", "stripe_width", "blocks_width"])
def _prefill_kernel(
    Q, K, V, O, KPOS, KV_START, STREAMING, HEADS, FULL_OFFSETS, FULL_INDICES, PART_OFFSETS, PART_INDICES,
    WINDOW, STRIPES, TILE_COUNTS, stripe_width, STRIPE_BLOCKS, STRIPE_FLAGS, TILE_BLOCK_COUNTS, blocks_width,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_pb, stride_pn,
    num_kv_heads, q_len, k_len, q_first, sink, local, scale_log2, softcap_log2, num_mask_q_blocks, mask_block_q,
    SINKS, GROUPS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CONSECUTIVE: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_LIST: tl.constexpr, TMA: tl.constexpr, STRIPE_MODE: tl.constexpr,
    MAPPED: tl.constexpr, KV_MAPPED: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    pid_q = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest causal rows first: a shorter tail
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads  # the program's KV head among those attended
    hq = h  # its KV-head group in Q and O
    if MAPPED:
        hq = tl.load(HEADS + h).to(tl.int32)
    hk = h  # its head in K and V
    if KV_MAPPED:
        hk = hq
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    qi = pid_q * BLOCK_Q + offs_m // G_PAD  # query index of each row
    g = offs_m % G_PAD  # head within the group (rows of padding heads, g >= GROUPS, are masked)
    head = hq * GROUPS + g  # query head of each row
    row_ok = (qi < q_len) & (g < GROUPS)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = q_first + qi
    start = tl.load(KV_START + b).to(tl.int32)
    is_stream = tl.load(STREAMING + h).to(tl.int32)
    if STRIPE_MODE:  # SampleAttention: the window runs as a streaming head without sink, stripes after it
        is_stream = is_stream * 0 + 1
        sink = sink * 0
        local = tl.load(WINDOW + pid_bh).to(tl.int32)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    KD = K  # unused unless TMA
    VD = V
    if TMA:
        KD = tl.make_tensor_descriptor(K, shape=[k_len, HEAD_DIM], strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM])
        VD = tl.make_tensor_descriptor(V, shape=[k_len, HEAD_DIM], strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    KPOS += b * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    first_q = q_first + pid_q * BLOCK_Q  # smallest and largest query slot of the tile
    last_q = tl.minimum(first_q + BLOCK_Q, q_first + q_len) - 1
    if BLOCK_LIST:  # the key blocks listed for this (KV head, query block); causal + padding inside
        row = h * (num_mask_q_blocks + 1) + (pid_q * BLOCK_Q) // mask_block_q
        # full blocks (below the diagonal for every query) need no mask unless the row is padded
        if start == 0:
            for i in range(tl.load(FULL_OFFSETS + row), tl.load(FULL_OFFSETS + row + 1)):
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, tl.load(FULL_INDICES + i) * BLOCK_N, K, V, KD, VD, KPOS, stride_kn, stride_kd,
                    stride_vn, stride_vd, stride_pn, qpos, start, 0, sink, local, k_len, scale_log2, softcap_log2, offs_d,
                    HEAD_DIM, D_PAD, BLOCK_N, CONSECUTIVE, UPCAST, PRECISION, False, TMA)
        else:
            for i in range(tl.load(FULL_OFFSETS + row), tl.load(FULL_OFFSETS + row + 1)):
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, tl.load(FULL_INDICES + i) * BLOCK_N, K, V, KD, VD, KPOS, stride_kn, stride_kd,
                    stride_vn, stride_vd, stride_pn, qpos, start, 0, sink, local, k_len, scale_log2, softcap_log2, offs_d,
                    HEAD_DIM, D_PAD, BLOCK_N, CONSECUTIVE, UPCAST, PRECISION, True, TMA)
        for i in range(tl.load(PART_OFFSETS + row), tl.load(PART_OFFSETS + row + 1)):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, tl.load(PART_INDICES + i) * BLOCK_N, K, V, KD, VD, KPOS, stride_kn, stride_kd,
                stride_vn, stride_vd, stride_pn, qpos, start, 0, sink, local, k_len, scale_log2, softcap_log2, offs_d,
                HEAD_DIM, D_PAD, BLOCK_N, CONSECUTIVE, UPCAST, PRECISION, True, TMA)
    elif CONSECUTIVE:
        end = tl.minimum(last_q + 1, k_len)
        lo = (start // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(start, BLOCK_N) * BLOCK_N  # interior blocks: all real, all causal ...
        if is_stream != 0:
            # blocks holding the sink (with the full rule, so window keys in them count too) ...
            sink_blocks_end = tl.cdiv(tl.minimum(start + sink, end), BLOCK_N) * BLOCK_N
            acc, m_i, l_i = _attend_range(
                acc, m_i, l_i, q, lo, sink_blocks_end, K, V, KD, VD, KPOS, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_pn, qpos, start, is_stream, sink, local, k_len, scale_log2, softcap_log2, offs_d,
                HEAD_DIM, D_PAD, BLOCK_N, CONSECUTIVE, UPCAST, PRECISION, True, TMA)
            # ... then the window's blocks that come after them
            lo = tl.maximum(tl.maximum(sink_blocks_end, ((first_q - local + 1) // BLOCK_N) * BLOCK_N), 0)
            full_lo = tl.maximum(full_lo, tl.cdiv(tl.maximum(last_q - local + 1, 0), BLOCK_N) * BLOCK_N)  # ... in every row's window
        full_lo = tl.maximum(full_lo, lo)
        full_hi = tl.maximum(((first_q + 1) // BLOCK_N) * BLOCK_N, full_lo)  # ... below the first row's diagonal
        full_hi = tl.minimum(full_hi, end)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, lo, full_lo, K, V, KD, VD, KPOS, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
            qpos, start, is_stream, sink, local, k_len, scale_log2, softcap_log2, offs_d,
            HEAD_DIM, D_PAD, BLOCK_N, CONSECUTIVE, UPCAST, PRECISION, True, TMA)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, full_lo, full_hi, K, V, KD, VD, KPOS, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
            qpos, start, is_stream, sink, local, k_len, scale_log2, softcap_log2, offs_d,
            HEAD_DIM, D_PAD, BLOCK_N, CONSECUTIVE, UPCAST, PRECISION, False, TMA)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, full_hi, end, K, V, KD, VD, KPOS, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
            qpos, start, is_stream, sink, local, k_len, scale_log2, softcap_log2, offs_d,
            HEAD_DIM, D_PAD, BLOCK_N, CONSECUTIVE, UPCAST, PRECISION, True, TMA)
    else:
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, 0, k_len, K, V, KD, VD, KPOS, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
            qpos, start, is_stream, sink, local, k_len, scale_log2, softcap_log2, offs_d,
            HEAD_DIM, D_PAD, BLOCK_N, CONSECUTIVE, UPCAST, PRECISION, True, TMA)
    if STRIPE_MODE:
        # key blocks dense with stripes, whole (those left of the tile's last window), then the other stripes
        n_blocks = tl.load(TILE_BLOCK_COUNTS + pid_bh * tl.num_programs(0) + pid_q)
        for i in range(0, n_blocks):
            acc, m_i, l_i = _attend_stripe_block(
                acc, m_i, l_i, q, tl.load(STRIPE_BLOCKS + pid_bh * blocks_width + i) * BLOCK_N, K, V, KD, VD,
                STRIPE_FLAGS + pid_bh * k_len, stride_kn, stride_kd, stride_vn, stride_vd, qpos, start, local, k_len,
                scale_log2, softcap_log2, offs_d, HEAD_DIM, BLOCK_N, UPCAST, PRECISION, TMA)
        n_cols = tl.load(TILE_COUNTS + pid_bh * tl.num_programs(0) + pid_q)  # stripes left of the tile's windows
        for s0 in range(0, n_cols, BLOCK_N):
            idx = s0 + tl.arange(0, BLOCK_N)
            ok = idx < n_cols
            cols = tl.load(STRIPES + pid_bh * stripe_width + idx, mask=ok, other=0)
            acc, m_i, l_i = _attend_columns(
                acc, m_i, l_i, q, cols, ok, K, V, stride_kn, stride_kd, stride_vn, stride_vd, qpos, start, local,
                scale_log2, softcap_log2, offs_d, HEAD_DIM, UPCAST, PRECISION)
    if HAS_SINKS:  # learned sinks: one more logit per query head (natural units), no value
        sink_log2 = tl.load(SINKS + head, mask=row_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        acc, m_i, l_i = _merge_sink(acc, m_i, l_i, sink_log2)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that sees nothing gets zeros
    tl.store(O + b * stride_ob + qi[:, None] * stride_om + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


def _config(head_dim: int) -> dict:
    """Tile settings. Measured on an H100 (bf16, head_dim 128, 32K causal; benchmarks/NOTES.md):
    128 x 128 tiles with 8 warps and 3 stages were fastest of 36 configurations; larger head dims
    get narrower key blocks to fit shared memory."""
    if head_dim <= 128:
        return {"block_n": 128, "num_warps": 8, "num_stages": 3}
    return {"block_n": 64, "num_warps": 8, "num_stages": 2}


def _tma_ok(key: torch.Tensor, value: torch.Tensor, head_dim: int) -> bool:
    """Bulk tensor copies (Hopper+) need a power-of-two head_dim, unit-stride rows and 16-byte aligned
    row starts; on first use Triton also needs an allocator for the descriptors it builds on the device."""
    if _INTERPRETING or not key.is_cuda or torch.cuda.get_device_capability(key.device)[0] < 9:
        return False
    if head_dim != triton.next_power_of_2(head_dim) or head_dim < 16:
        return False
    for t in (key, value):
        if t.stride(-1) != 1 or (t.stride(-2) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
        if any((st * t.element_size()) % 16 for st in t.stride()[:2]):
            return False
    ensure_allocator()
    return True


_THREAD = threading.local()


def ensure_allocator() -> None:
    """Give Triton an allocator for the descriptors it builds on the device, once per thread: Triton keeps it in a
    context variable, which a new thread (Transformers' continuous-batching loop, a server's workers) starts without."""
    if not getattr(_THREAD, "allocator_set", False):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _THREAD.allocator_set = True


def _stripe_arguments(mask, q_first: int, q_len: int, block_q: int, block_n: int,
                      whole_block_share: float | None) -> list:
    """Per (row x KV head): window; the key blocks holding at least ``whole_block_share`` x block_n stripes
    (visited whole, sorted, padded with the block count) and a flag per key column marking stripes; the other
    stripes ([.., K] sorted, padded with k_len, gathered column by column); and per query tile how many
    blocks and how many gathered stripes lie left of the tile's last window (the only ones any of its rows
    can see outside its window). No host synchronization."""
    batch_heads, k_len = mask.stripes.shape[0] * mask.stripes.shape[1], mask.k_len
    window = mask.window.reshape(batch_heads).contiguous()
    stripes = mask.stripes.reshape(batch_heads, -1).contiguous()
    tiles = torch.arange(triton.cdiv(q_len, block_q), device=stripes.device)
    last = q_first + torch.clamp((tiles + 1) * block_q, max=q_len) - 1
    limit = (last[None, :] - window[:, None]).to(stripes.dtype).contiguous()
    num_blocks = triton.cdiv(k_len, block_n)
    block_ids = torch.arange(num_blocks, device=stripes.device, dtype=stripes.dtype)
    if whole_block_share is None:  # gather every stripe
        blocks = torch.full((batch_heads, 1), num_blocks, dtype=stripes.dtype, device=stripes.device)
        flags = torch.zeros(batch_heads, 1, dtype=torch.uint8, device=stripes.device)
    else:
        real = stripes < k_len
        per_block, block_of = (t.reshape(batch_heads, -1) for t in mask.stripes_per_block(block_n))
        whole = per_block >= max(1, math.ceil(whole_block_share * block_n))
        whole[:, num_blocks] = False
        in_whole = whole.gather(1, block_of)
        blocks = torch.sort(torch.where(whole[:, :num_blocks], block_ids, num_blocks), dim=-1).values.contiguous()
        flags = torch.zeros(batch_heads, k_len + 1, dtype=torch.uint8, device=stripes.device)
        flags = flags.scatter_(1, torch.where(real, stripes, k_len).long(), 1)[:, :k_len].contiguous()
        stripes = torch.sort(torch.where(in_whole, k_len, stripes), dim=-1).values.contiguous()
    counts = torch.searchsorted(stripes, limit, right=True).to(torch.int32)
    block_counts = torch.searchsorted((blocks * block_n).contiguous(), limit, right=True).to(torch.int32)
    return [window, stripes, counts.contiguous(), stripes.shape[1], blocks, flags, block_counts.contiguous(),
            blocks.shape[1]]


def _block_q(groups: int, block_m: int) -> int:
    return max(block_m // groups, 16 if groups == 1 else 1)


@dataclass(frozen=True)
class Launch:
    """How the prefill kernel is launched: query rows and key block per program (``block_n`` None: tuned per
    head_dim), warps and pipeline stages (None: tuned), bulk tensor copies where the layout allows (``tma``;
    False forces pointer loads, for comparisons)."""

    block_m: int = 128
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    tma: bool = True


def sparse_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: Visibility,
    terms: LogitTerms,
    *,
    out: torch.Tensor | None = None,
    block_mask: BlockSparseMask | None = None,
    stripe_mask=None,
    whole_block_share: float | None = None,
    launch: Launch = Launch(),
) -> torch.Tensor:
    """Launch the kernel. query [B, Hq, Lq, D]; key/value [B, Hkv, Lk, D]; what each query sees: ``visible``
    (query slots ``q_first + i``, key slots ``k_pos`` [B, Lk] or None for 0..Lk-1); ``terms``: the logit terms of
    ``kernels.reference``. Returns [B, Lq, Hq, D] (``out`` if given).

    With ``block_mask`` (one row list per KV head) each program visits only the listed key blocks
    (causality and padding still apply; ``streaming`` is ignored); its ``block_k`` sets the key block.
    With ``stripe_mask`` (a :class:`~sparse_attn_hf.stripe_mask.StripeMask`, SampleAttention) every head
    attends to its row's window and stripes (``streaming``, ``sink``, ``local`` are ignored); key blocks
    holding at least ``whole_block_share`` x block_n stripes are visited whole with a column mask, the other
    stripes gathered (``None``: every stripe gathered).
    With ``visible.heads`` (int64 [n]) the programs attend only those KV-head groups of ``query``
    (``visible.groups`` query heads each) and write them into ``out`` (required); key/value hold the n heads in
    order, or every KV head when ``visible.key_all_heads`` (then head ``heads[i]`` is read in place). ``sinks``
    are indexed by query head of ``query``.
    """
    q_first, k_pos, kv_start = visible.q_first, visible.k_pos, visible.kv_start
    sink, local, heads, groups = visible.sink, visible.local, visible.heads, visible.groups
    scale, softcap, sinks = terms.scale, terms.softcap, terms.sinks
    block_m, block_n, num_warps, num_stages = launch.block_m, launch.block_n, launch.num_warps, launch.num_stages
    streaming = visible.streaming_flags(key.shape[1] if heads is None else heads.shape[0], query.device)
    if block_mask is not None and stripe_mask is not None:
        raise ValueError("pass block_mask or stripe_mask, not both: each lists keys to visit, and together "
                         "they would count a key twice.")
    batch, num_heads, q_len, head_dim = query.shape
    tuned = _config(head_dim)
    block_n = block_n or tuned["block_n"]
    num_warps = num_warps or tuned["num_warps"]
    num_stages = num_stages or tuned["num_stages"]
    k_len = key.shape[2]
    if heads is None:
        num_kv_heads, groups = key.shape[1], num_heads // key.shape[1]
    else:
        if out is None or groups is None:
            raise ValueError("Visibility.heads needs out= and Visibility.groups.")
        num_kv_heads = heads.shape[0]
    g_pad = triton.next_power_of_2(groups)  # a program's rows must be a power of two
    block_q = _block_q(g_pad, block_m)
    if block_mask is not None:
        if (block_mask.num_heads, block_mask.q_len, block_mask.k_len) != (num_kv_heads, q_len, k_len) or k_pos is not None:
            raise ValueError(f"{block_mask} does not fit {num_kv_heads} KV heads, q_len {q_len}, k_len {k_len} "
                             "(and needs consecutive key slots).")
        if block_mask.block_q % block_q:
            raise ValueError(f"block_mask.block_q={block_mask.block_q} must be a multiple of {block_q}.")
        block_n = block_mask.block_k
    tma = launch.tma and _tma_ok(key, value, head_dim)
    if out is None:
        out = torch.empty(batch, q_len, num_heads, head_dim, dtype=query.dtype, device=query.device)
    consecutive = k_pos is None
    pos = kv_start if consecutive else k_pos  # any tensor: not read when consecutive
    grid = (triton.cdiv(q_len, block_q), batch * num_kv_heads)
    lists = [kv_start] * 4  # any tensors when unused
    if block_mask is not None:
        full, partial = block_mask.full_and_partial()
        lists = [full.offsets, full.indices, partial.offsets, partial.indices]
    stripe_args = [kv_start, kv_start, kv_start, 0, kv_start, kv_start, kv_start, 0]
    if stripe_mask is not None:
        if k_pos is not None or stripe_mask.stripes.shape[:2] != (batch, num_kv_heads):
            raise ValueError(f"{stripe_mask} does not fit batch {batch} x {num_kv_heads} KV heads (and needs "
                             "consecutive key slots).")
        stripe_args = _stripe_arguments(stripe_mask, q_first, q_len, block_q, block_n, whole_block_share)
        kv_start = stripe_mask.kv_start
    mapped = heads is not None
    _prefill_kernel[grid](
        query, key, value, out, pos, kv_start, streaming, heads if mapped else kv_start, *lists, *stripe_args,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        pos.stride(0), pos.stride(-1),
        num_kv_heads, q_len, k_len, q_first, sink, local, scale * LOG2E, (softcap or 0.0) * LOG2E,
        block_mask.num_q_blocks if block_mask is not None else 0,
        block_mask.block_q if block_mask is not None else 1,
        sinks if sinks is not None else kv_start,
        GROUPS=groups, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), CONSECUTIVE=consecutive,
        UPCAST=_INTERPRETING and query.dtype == torch.bfloat16,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 inputs: exact, not tf32
        BLOCK_LIST=block_mask is not None, TMA=tma, STRIPE_MODE=stripe_mask is not None,
        MAPPED=mapped, KV_MAPPED=mapped and visible.key_all_heads, HAS_SINKS=sinks is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
