"""Dense heads' prefill: the fastest correct kernel at hand (SDPA as stock calls it, cuDNN twice for a prompt
chunk, the package's kernel where rows are padded or the family has logit terms SDPA lacks)."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._log import log_once
from ..kernels.layout import LogitTerms, Visibility
from . import dispatch
from .dispatch import KERNEL_DTYPES, _use_triton
from .prefill import _check_attention_inputs, sparse_attention


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, terms: LogitTerms, *,
                    kv_start: torch.Tensor, padded: bool, shapes_vary: bool = False) -> torch.Tensor:
    """Causal attention of dense heads -> [B, Lq, Hq, D] (possibly a non-contiguous view).

    query [B, Hq, Lq, D] holds the last Lq of the Lk slots of key/value [B, Hkv, Lk, D] (bottom-right
    causality, GQA without repeated K/V); kv_start [B]; ``padded`` False promises every kv_start is 0 (the
    caller knows it without a device sync). Contract: ``kernels.reference`` with no streaming head.

    Runs the fastest correct kernel at hand: PyTorch SDPA (cuDNN / flash, ``enable_gqa``, as stock
    Transformers calls it) when nothing is padded; with padding, the Triton kernel on CUDA (fp16/bf16) and
    SDPA with an explicit mask elsewhere (a row that sees no key gets zeros). SDPA has no learned sinks and no
    soft-capping: with those ``terms`` the package's kernel (or its reference) runs.

    cuDNN builds an execution plan per shape, milliseconds of host time each: a single query (a decode step outside
    the package's cache) and ``shapes_vary`` calls (continuous batching's requests, each call its own lengths) run
    SDPA without cuDNN, and a chunk of such a call the Triton kernel (:func:`plans_pay`).
    """
    scale = terms.scale
    _check_attention_inputs(query, key, value, kv_start)
    batch, num_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    if num_heads % key.shape[1] or q_len > k_len:
        raise ValueError(f"query {tuple(query.shape)} does not fit key {tuple(key.shape)}: the query heads must be a "
                         "multiple of the KV heads and Lq <= Lk.")

    def kernel(query):  # the package's own kernel (or reference) with no streaming head
        # local=1 as every dense call before: Triton specialises an integer argument equal to 1 (one compiled variant)
        return sparse_attention(query, key, value, Visibility(kv_start, local=1, q_first=k_len - q_len), terms)

    if dispatch._backend != "auto" or not terms.plain:  # pinned by tests, or terms SDPA lacks
        return kernel(query)
    gqa = {"enable_gqa": True} if num_heads != key.shape[1] else {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    plans = plans_pay(query.is_cuda, q_len, shapes_vary)
    if not plans:
        sdpa = _sdpa_without_cudnn
    if query.is_cuda and key.stride(2) == key.shape[3] and query.stride(2) != query.shape[3]:
        # q, k, v in one layout ([B, H, L, D], the cache's pages): cuDNN gains about what the copy costs (H200,
        # 32K, 16 of 32 heads: 7.44 + 0.17 ms against 7.64 ms; benchmarks/results/prefill_gathers.json)
        query = query.contiguous()
    if not padded:
        if q_len == k_len:
            return sdpa(query, key, value, is_causal=True, scale=scale, **gqa).transpose(1, 2)
        if q_len == 1:
            return sdpa(query, key, value, scale=scale, **gqa).transpose(1, 2)
        if plans and query.is_cuda and query.dtype in KERNEL_DTYPES and _SPLIT_CUDNN.get(str(query.device), True):
            try:
                return split_causal_attention(_cudnn_with_lse, query, key, value, scale).transpose(1, 2)
            except (RuntimeError, AttributeError, NotImplementedError) as error:  # no cuDNN op for this shape
                _SPLIT_CUDNN[str(query.device)] = False
                log_once(f"sparse_attn_hf: cuDNN attention with log-sum-exp is not available here ({error}); "
                         "chunked prefill runs the Triton kernel.")
        if _use_triton(query):  # faster than SDPA's bottom-right path (flash 2), measured: NOTES.md
            return kernel(query)
        if query.is_cuda and _LOWER_RIGHT_SDPA.get(str(query.device), True):
            try:
                from torch.nn.attention.bias import causal_lower_right

                bias = causal_lower_right(q_len, k_len)
                return sdpa(query, key, value, attn_mask=bias, scale=scale, **gqa).transpose(1, 2)
            except (RuntimeError, NotImplementedError) as error:  # no fused kernel for this shape or version
                _LOWER_RIGHT_SDPA[str(query.device)] = False
                log_once(f"sparse_attn_hf: SDPA cannot run bottom-right causal attention here ({error}); "
                         "chunked prefill runs the Triton kernel.")
    if _use_triton(query):
        return kernel(query)
    slots = torch.arange(k_len, device=query.device)
    seen = (slots[None, :] <= slots[k_len - q_len :, None])[None] & (slots >= kv_start[:, None])[:, None, :]
    out = sdpa(query, key, value, attn_mask=seen[:, None], scale=scale, **gqa)
    out = torch.where(seen.any(-1)[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)


_LOWER_RIGHT_SDPA: dict[str, bool] = {}
_SPLIT_CUDNN: dict[str, bool] = {}


def plans_pay(is_cuda: bool, q_len: int, shapes_vary: bool) -> bool:
    """Whether cuDNN's attention may run: its plan per shape costs milliseconds of host time (measured in continuous
    batching on an H100: 8.3 ms per call, 2240 calls, against 1.8 s of GPU work in all; benchmarks/NOTES.md, session
    16), paid back only by a long query over a shape that repeats (a prompt, a chunk of a fixed size)."""
    return not is_cuda or (q_len > 1 and not shapes_vary)


_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_without_cudnn(*args, **kwargs):
    """SDPA restricted to flash, memory-efficient and math kernels (no per-shape plans)."""
    with sdpa_kernel(_NO_CUDNN):
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)


def _cudnn_with_lse(query, key, value, causal: bool, scale: float):
    """PyTorch's cuDNN attention (GQA as it is), returning (out [B, H, Lq, D], natural-log LSE)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, causal, False,
                                                             scale=scale)
    return out[0], out[1]


def split_causal_attention(attend, query, key, value, scale: float) -> torch.Tensor:
    """Bottom-right causal attention of Lq < Lk rows as two calls of ``attend`` (a kernel that returns the
    log-sum-exp): the Lk - Lq earlier keys without a mask, the rows' own Lq x Lq square with the usual
    top-left ``is_causal``; merged as o1 + (o2 - o1) * sigmoid(lse2 - lse1). -> [B, Hq, Lq, D].

    SDPA sends bottom-right causality to its flash-2 backend, while cuDNN runs 1.7-1.8x faster on Hopper
    (benchmarks/NOTES.md); this keeps chunked prefill on cuDNN."""
    prefix = key.shape[2] - query.shape[2]
    own, own_lse = attend(query, key[:, :, prefix:], value[:, :, prefix:], True, scale)
    earlier, earlier_lse = attend(query, key[:, :, :prefix], value[:, :, :prefix], False, scale)
    shape = (*own.shape[:3], 1)
    weight = torch.sigmoid(own_lse.reshape(shape).float() - earlier_lse.reshape(shape).float())
    merged = earlier.float()
    del earlier
    return merged.lerp_(own.float(), weight).to(query.dtype)
