"""The seam between the plugin and its kernels: checks inputs, then picks an implementation.

On CUDA with float16/bfloat16 the Triton kernel runs; everywhere else the PyTorch reference (with one
logged reason). Both follow the contract of ``kernels/reference.py``.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import cost
from ._log import log_once, warn_once
from .kernels.layout import DecodeKV
from .kernels.reference import (
    append_token_reference,
    decode_visible_tokens,
    paged_decode_reference,
    physical_page_scores_reference,
    sampled_column_scores_reference,
    shortlist_pages_reference,
    sparse_attention_reference,
    stripe_attention_reference,
    top_pages_reference,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_MAX_HEAD_DIM = 256
_backend = "auto"


def set_backend(name: str) -> None:
    """``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` (also on the CPU under
    ``TRITON_INTERPRET=1``, for tests) or ``"reference"``."""
    global _backend
    if name not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {name!r}.")
    _backend = name


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model spread over GPUs by
    ``device_map`` has layers on several devices)."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"sparse_attn_hf supports float16, bfloat16 and float32 attention, got {dtype}; "
            "load or cast the model to one of them (for example model.to(torch.bfloat16))."
        )


def _reference_reason(dtype: torch.dtype, head_dim: int, device: torch.device) -> str | None:
    """Why an op on these inputs runs the PyTorch reference rather than its Triton kernel, or None."""
    if _backend == "reference":
        return "set_backend('reference') runs the PyTorch reference"
    if _backend == "triton":
        return None
    if device.type != "cuda":
        return "not CUDA: the PyTorch reference runs"
    if dtype not in KERNEL_DTYPES:
        return f"{dtype} runs the PyTorch reference (the Triton kernel takes fp16/bf16)"
    if head_dim > KERNEL_MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {KERNEL_MAX_HEAD_DIM} runs the PyTorch reference"
    return None


def _decode_kernel_takes(page_size: int) -> bool:
    return page_size >= 16 and page_size & (page_size - 1) == 0


def _selection_kernel_takes(page_size: int, logical_page_size: int, head_dim: int) -> bool:
    per_page = page_size // logical_page_size
    return per_page & (per_page - 1) == 0 and head_dim >= 16


def _use_triton(query: torch.Tensor) -> bool:
    reason = _reference_reason(query.dtype, query.shape[-1], query.device)
    if reason is not None and query.is_cuda and _backend == "auto":  # a GPU user loses the kernels' speed
        warn_once(f"sparse_attn_hf: {reason}.")
    return reason is None


def decode_on_host(dtype: torch.dtype, head_dim: int, device: torch.device, page_size: int,
                   logical_page_size: int) -> str | None:
    """Why a decode step with these settings would run part of the PyTorch reference, which reads device
    values on the host (a CUDA graph cannot capture it); None when every decode op runs its Triton kernel
    (the conditions of ``_paged_decode`` and ``_physical_page_scores``)."""
    reason = _reference_reason(dtype, head_dim, device)
    if reason is not None:
        return reason
    if not _decode_kernel_takes(page_size) or not _selection_kernel_takes(page_size, logical_page_size, head_dim):
        return (f"page_size {page_size}, logical_page_size {logical_page_size} or head_dim {head_dim} runs the "
                "PyTorch reference of page selection or decoding")
    return None


def _check_attention_inputs(query, key, value, kv_start) -> None:
    check_dtype(query.dtype)
    if query.ndim != 4 or key.ndim != 4 or key.shape != value.shape:
        raise ValueError(
            f"expected query [B, Hq, Lq, D] and key/value [B, Hkv, Lk, D] of one shape, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    batch, num_heads, q_len, head_dim = query.shape
    if key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"query {tuple(query.shape)} does not fit key {tuple(key.shape)}: batch and head_dim must agree.")
    if q_len == 0 or key.shape[2] == 0:
        raise ValueError("attention over an empty sequence (0 tokens): pass at least one token.")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}.")
    if kv_start.shape != (batch,):
        raise ValueError(f"kv_start must be [B] = [{batch}], got {tuple(kv_start.shape)}.")


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    q_first: int,
    k_pos: torch.Tensor | None,
    kv_start: torch.Tensor,
    streaming: torch.Tensor,
    sink: int,
    local: int,
    scale: float,
    tile: int = 256,
    heads: torch.Tensor | None = None,
    groups: int = 1,
    key_all_heads: bool = False,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Dense + streaming attention of one layer -> [B, Lq, Hq, D].

    query [B, Hq, Lq, D] at slots ``q_first + i``; key/value [B, Hkv, Lk, D] at slots ``k_pos`` [B, Lk]
    (``None``: 0..Lk-1); kv_start [B]; streaming [Hkv] bool. Rule: ``kernels.reference``.

    ``heads`` (int64 [n]) restricts the call to the query heads of those KV-head groups of ``query``
    (Hq = ``groups`` x Hkv_total, query head ``h * groups + g`` belongs to KV head ``h``): key/value then hold
    the n heads in order, or every KV head when ``key_all_heads`` (head ``heads[i]`` is read, no copy);
    ``streaming`` is [n]; the result goes into those heads of ``out`` [B, Lq, Hq, D] (required), the other
    heads are left as they are. ``sinks`` (float [Hq], by query head of ``query``) and ``softcap``: the
    optional terms of ``kernels.reference``.
    """
    _check_attention_inputs(query, key, value, kv_start)
    batch, num_heads, q_len, head_dim = query.shape
    if heads is None:
        if num_heads % key.shape[1]:
            raise ValueError(f"the query heads ({num_heads}) must be a multiple of the KV heads ({key.shape[1]}).")
        n = key.shape[1]
    else:
        n = heads.shape[0]
        if (out is None or out.shape != (batch, q_len, num_heads, head_dim) or heads.ndim != 1
                or num_heads % groups or (not key_all_heads and key.shape[1] != n)
                or (key_all_heads and key.shape[1] * groups != num_heads)):
            raise ValueError("with heads=, pass out [B, Lq, Hq, D] and key/value holding those heads "
                             "(or every KV head with key_all_heads=True).")
    if streaming.shape != (n,):
        raise ValueError(f"streaming must be [{n}] (one flag per attended KV head), got {tuple(streaming.shape)}.")
    if k_pos is not None and tuple(k_pos.shape) != (batch, key.shape[2]):
        raise ValueError(f"k_pos must be [B, Lk] = [{batch}, {key.shape[2]}], got {tuple(k_pos.shape)}.")
    if _use_triton(query):
        from .kernels.prefill import sparse_attention_triton

        with _on_device(query):
            return sparse_attention_triton(
                query, key, value, q_first=q_first, k_pos=k_pos, kv_start=kv_start, streaming=streaming,
                sink=sink, local=local, scale=scale, heads=heads, groups=groups, key_all_heads=key_all_heads,
                out=out, sinks=sinks, softcap=softcap,
            )
    terms = sinks is not None or softcap is not None
    if _backend == "auto" and query.device.type == "cpu" and k_pos is None and bool(streaming.all()) and not terms:
        # the CPU path for streaming heads: one fused SDPA call over window tiles (same rule)
        from .kernels.window_sdpa import streaming_attention_sdpa

        def attend(q, k, v, sinks=None):
            return streaming_attention_sdpa(q, k, v, q_first=q_first, kv_start=kv_start, sink=sink, local=local,
                                            scale=scale, tile=tile)
    else:
        q_pos = torch.arange(q_first, q_first + q_len, device=query.device).expand(batch, -1)
        k_pos = torch.arange(key.shape[2], device=query.device).expand(batch, -1) if k_pos is None else k_pos

        def attend(q, k, v, sinks=sinks):
            return sparse_attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, kv_start=kv_start,
                                              streaming=streaming, sink=sink, local=local, scale=scale, tile=tile,
                                              sinks=sinks, softcap=softcap)
    if heads is None:
        result = attend(query, key, value)
        return result if out is None else out.copy_(result)
    # PyTorch paths attend gathered heads; the result is scattered into ``out``
    picked = query.unflatten(1, (-1, groups)).index_select(1, heads).flatten(1, 2)
    if sinks is not None:
        sinks = sinks.view(-1, groups).index_select(0, heads).flatten()
    if key_all_heads:
        key, value = key.index_select(1, heads), value.index_select(1, heads)
    out.unflatten(2, (-1, groups)).index_copy_(2, heads, attend(picked, key, value, sinks).unflatten(2, (n, groups)))
    return out


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, kv_start: torch.Tensor,
                    padded: bool, scale: float, sinks: torch.Tensor | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Causal attention of dense heads -> [B, Lq, Hq, D] (possibly a non-contiguous view).

    query [B, Hq, Lq, D] holds the last Lq of the Lk slots of key/value [B, Hkv, Lk, D] (bottom-right
    causality, GQA without repeated K/V); kv_start [B]; ``padded`` False promises every kv_start is 0 (the
    caller knows it without a device sync). Contract: ``kernels.reference`` with no streaming head.

    Runs the fastest correct kernel at hand: PyTorch SDPA (cuDNN / flash, ``enable_gqa``, as stock
    Transformers calls it) when nothing is padded; with padding, the Triton kernel on CUDA (fp16/bf16) and
    SDPA with an explicit mask elsewhere (a row that sees no key gets zeros). SDPA has no learned sinks and no
    soft-capping: with ``sinks`` or ``softcap`` the package's kernel (or its reference) runs.
    """
    _check_attention_inputs(query, key, value, kv_start)
    batch, num_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    if num_heads % key.shape[1] or q_len > k_len:
        raise ValueError(f"query {tuple(query.shape)} does not fit key {tuple(key.shape)}: the query heads must be a "
                         "multiple of the KV heads and Lq <= Lk.")

    def kernel(query):  # the package's own kernel (or reference) with no streaming head
        no_stream = torch.zeros(key.shape[1], dtype=torch.bool, device=query.device)
        return sparse_attention(query, key, value, q_first=k_len - q_len, k_pos=None, kv_start=kv_start,
                                streaming=no_stream, sink=0, local=1, scale=scale, sinks=sinks, softcap=softcap)

    if _backend != "auto" or sinks is not None or softcap is not None:  # pinned by tests, or terms SDPA lacks
        return kernel(query)
    gqa = {"enable_gqa": True} if num_heads != key.shape[1] else {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if query.is_cuda and key.stride(2) == key.shape[3] and query.stride(2) != query.shape[3]:
        # q, k, v in one layout ([B, H, L, D], the cache's pages): cuDNN gains about what the copy costs (H200,
        # 32K, 16 of 32 heads: 7.44 + 0.17 ms against 7.64 ms; benchmarks/prefill_gathers.py)
        query = query.contiguous()
    if not padded:
        if q_len == k_len:
            return sdpa(query, key, value, is_causal=True, scale=scale, **gqa).transpose(1, 2)
        if q_len == 1:
            return sdpa(query, key, value, scale=scale, **gqa).transpose(1, 2)
        if query.is_cuda and query.dtype in KERNEL_DTYPES and _SPLIT_CUDNN.get(str(query.device), True):
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
    visible = (slots[None, :] <= slots[k_len - q_len :, None])[None] & (slots >= kv_start[:, None])[:, None, :]
    out = sdpa(query, key, value, attn_mask=visible[:, None], scale=scale, **gqa)
    out = torch.where(visible.any(-1)[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)


_LOWER_RIGHT_SDPA: dict[str, bool] = {}
_SPLIT_CUDNN: dict[str, bool] = {}


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


def paged_decode(query: torch.Tensor, kv: DecodeKV, *, kv_start: torch.Tensor, sink: int, local: int,
                 scale: float, sinks: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """One decode step of one layer over a SparseCache -> [B, Hq, D]. query [B, Hq, D] at slot
    ``kv.seen - 1``; contract: ``kernels.reference.paged_decode_reference``."""
    check_dtype(query.dtype)
    if query.ndim != 3 or query.shape[1] % kv.head_kind.shape[0]:
        raise ValueError(f"expected query [B, Hq, D] with Hq a multiple of {kv.head_kind.shape[0]} KV heads, "
                         f"got {tuple(query.shape)}.")
    if torch.compiler.is_compiling():  # an opaque operator for torch.compile (below)
        return torch.ops.sparse_attn_hf.paged_decode(query, kv.step, kv.head_kind, kv.head_slot,
                                                     *(getattr(kv, f) for f in _DECODE_KV_FIELDS), kv_start,
                                                     kv.page_size, sink, local, scale, sinks, softcap)
    return _paged_decode(query, kv, kv_start=kv_start, sink=sink, local=local, scale=scale, sinks=sinks,
                         softcap=softcap)


def _paged_decode(query, kv: DecodeKV, *, kv_start, sink: int, local: int, scale: float, sinks=None,
                  softcap=None) -> torch.Tensor:
    page = kv.page_size
    terms = dict(sinks=sinks, softcap=softcap)
    if _use_triton(query) and _decode_kernel_takes(page):
        from .kernels.decode import paged_decode_triton

        with _on_device(query):
            return paged_decode_triton(query, kv, kv_start=kv_start, sink=sink, local=local, scale=scale, **terms)
    if query.is_cuda and _backend == "auto" and query.dtype in KERNEL_DTYPES:
        warn_once(f"sparse_attn_hf: page_size {page} is not a power of two >= 16: decoding runs the PyTorch reference.")
    if _backend == "auto" and sinks is None and softcap is None:
        return _paged_decode_sdpa(query, kv, kv_start=kv_start, sink=sink, local=local, scale=scale)
    return paged_decode_reference(query, kv, kv_start=kv_start, sink=sink, local=local, scale=scale, **terms)


def _paged_decode_sdpa(query, kv: DecodeKV, *, kv_start, sink: int, local: int, scale: float) -> torch.Tensor:
    """The reference's decode step through SDPA, for a device without the Triton kernel (the CPU): the same
    visible tokens (``decode_visible_tokens``), the dense heads' keys read in place (no gathered copy, and no mask
    while a row sees every stored token), each head kind in one call with its query heads as rows. A kind's
    buffers hold its heads in head order (``head_slot`` is the rank among the kind, ``PatchState.head_tables``),
    so the heads of a kind in ascending order are its buffer's rows."""
    batch, num_heads, head_dim = query.shape
    num_kv = kv.head_kind.shape[0]
    q = query.view(batch, num_kv, num_heads // num_kv, head_dim)
    out = torch.empty_like(q)
    # no page chosen, the tail from page 0 and no row padded: the dense heads see every stored token, read in place
    every = (kv.dense_key is not None and (kv.pages is None or not kv.pages.numel()) and kv.tail_first == 0
             and not bool(kv_start.any()))
    parts = decode_visible_tokens(kv, kv_start, sink, local, dense=not every)
    if every:
        parts["dense"] = (kv.dense_key[:, :, : kv.seen], kv.dense_value[:, :, : kv.seen], None)
    for kind, (keys, values, visible) in parts.items():
        heads = torch.nonzero(kv.head_kind == (0 if kind == "dense" else 1)).flatten()
        mask = None if visible is None or bool(visible.all()) else visible[:, :, None, :]
        attended = torch.nn.functional.scaled_dot_product_attention(q[:, heads], keys, values, attn_mask=mask,
                                                                    scale=scale)
        out[:, heads] = attended.nan_to_num(0.0)  # a row that sees nothing: zeros, as the reference
    return out.view(batch, num_heads, head_dim)


def physical_page_scores(query, key_min, key_max, *, kv_start, seen: torch.Tensor, out: torch.Tensor,
                         reselect: torch.Tensor, page_size: int, logical_page_size: int) -> torch.Tensor:
    """Page-selection scores written into ``out`` [B, Hd, width] when ``reselect`` (int32 [1]) is set, else
    ``out`` is left as it is (the step reuses them); ``seen`` int32 [1], the tokens stored. Both live on the
    device, so the Triton path never waits for the host. Contract:
    ``kernels.reference.physical_page_scores_reference`` with ``seen=int(seen)``, ``width=out.shape[2]``."""
    if torch.compiler.is_compiling():
        torch.ops.sparse_attn_hf.physical_page_scores(query, key_min, key_max, kv_start, seen, out, reselect,
                                                      page_size, logical_page_size)
        return out
    _physical_page_scores(query, key_min, key_max, kv_start, seen, out, reselect, page_size, logical_page_size)
    return out


def _physical_page_scores(query, key_min, key_max, kv_start, seen, out, reselect, page_size: int,
                          logical_page_size: int) -> None:
    common = dict(kv_start=kv_start, page_size=page_size, logical_page_size=logical_page_size)
    if _use_triton(query) and _selection_kernel_takes(page_size, logical_page_size, query.shape[-1]):
        from .kernels.selection import physical_page_scores_triton

        with _on_device(query):
            physical_page_scores_triton(query, key_min, key_max, seen=seen, out=out, reselect=reselect, **common)
        return
    if int(reselect):  # the reference reads the host anyway (seen): a reusing step computes nothing
        out.copy_(physical_page_scores_reference(query, key_min, key_max, seen=int(seen), width=out.shape[2],
                                                 **common))


def top_pages(scores: torch.Tensor, *, out: torch.Tensor, reselect: torch.Tensor) -> torch.Tensor:
    """The ``out.shape[2]`` best pages of each row of ``scores`` [B, Hd, width] written into ``out`` (int32) when
    ``reselect`` (int32 [1], on the device) is set, else ``out`` is left as it is. Contract:
    ``kernels.reference.top_pages_reference``."""
    if torch.compiler.is_compiling():
        torch.ops.sparse_attn_hf.top_pages(scores, out, reselect)
        return out
    _top_pages(scores, out, reselect)
    return out


def _top_pages(scores, out, reselect) -> None:
    if scores.is_cuda and _backend != "reference" or _backend == "triton":  # float32 scores: any CUDA device
        from .kernels.selection import top_pages_triton

        with _on_device(scores):
            top_pages_triton(scores, out=out, reselect=reselect)
        return
    if int(reselect):  # the reference path reads the host: a reusing step computes nothing
        out.copy_(top_pages_reference(scores, out.shape[2]))


def compile_top_pages(max_width: int, device: torch.device) -> None:
    """Compile the top-k kernel for rows of up to ``max_width`` pages ahead of use (a CUDA model's warm-up); a
    no-op where the reference runs."""
    if device.type == "cuda" and _backend != "reference":
        from .kernels.selection import compile_top_pages as compile_ahead

        with _on_device(torch.empty(0, device=device)):
            compile_ahead(max_width, device)


def shortlist_pages(query, keys, bound, shortlist, *, kv_start, seen: torch.Tensor, out: torch.Tensor,
                    reselect: torch.Tensor, page_size: int, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Page selection's second stage: the ``out.shape[2]`` pages of ``shortlist`` of highest exact attention mass
    written into ``out`` (int32) when ``reselect`` (int32 [1]) is set, else ``out`` is left as it is; ``seen``
    int32 [1]. Both live on the device. Contract: ``kernels.reference.shortlist_pages_reference`` with
    ``seen=int(seen)``, ``k=out.shape[2]``."""
    if torch.compiler.is_compiling():
        torch.ops.sparse_attn_hf.shortlist_pages(query, keys, bound, shortlist, kv_start, seen, out, reselect,
                                                 page_size, scale, softcap)
        return out
    _shortlist_pages(query, keys, bound, shortlist, kv_start, seen, out, reselect, page_size, scale, softcap)
    return out


def _shortlist_pages(query, keys, bound, shortlist, kv_start, seen, out, reselect, page_size: int, scale: float,
                     softcap: float | None) -> None:
    common = dict(kv_start=kv_start, page_size=page_size, scale=scale, softcap=softcap)
    if _use_triton(query) and _decode_kernel_takes(page_size) and query.shape[-1] >= 16:
        from .kernels.selection import shortlist_pages_triton

        with _on_device(query):
            shortlist_pages_triton(query, keys, bound, shortlist, seen=seen, out=out, reselect=reselect, **common)
        return
    if int(reselect):  # the reference reads the host anyway (seen): a reusing step computes nothing
        out.copy_(shortlist_pages_reference(query, keys, bound, shortlist, seen=int(seen), k=out.shape[2], **common))


def append_token(key: torch.Tensor, value: torch.Tensor, tensors: dict, *, seen: torch.Tensor, kv_start: torch.Tensor,
                 head_kind: torch.Tensor, head_slot: torch.Tensor, sink: int, logical_page_size: int) -> bool:
    """Store one decode token of every KV head in a SparseCache layer's buffers with one Triton launch, at
    slot ``seen - 1`` (``seen`` int32 [1] on the device). Returns False where the kernel does not apply: the
    cache's PyTorch path (the contract) stores it."""
    if torch.compiler.is_compiling():  # the registered operator, whatever runs inside it
        torch.ops.sparse_attn_hf.append_token(key, value, *(tensors.get(name) for name in _APPEND_BUFFERS), seen,
                                              kv_start, head_kind, head_slot, sink, logical_page_size)
        return True
    if not _use_triton(key):
        return False
    _append_triton(key, value, tensors, seen=seen, kv_start=kv_start, head_kind=head_kind, head_slot=head_slot,
                   sink=sink, logical_page_size=logical_page_size)
    return True


def _append_triton(key, value, tensors: dict, *, seen, **common) -> None:
    from .kernels.append import append_token_triton

    with _on_device(key):
        append_token_triton(key, value, tensors, seen=seen, **common)


def sampled_column_scores(query, key, *, rows, q_first: int, kv_start, window, scale: float, sinks=None,
                          softcap=None) -> torch.Tensor:
    """SampleAttention stage 1 -> float32 [B, Hkv, Lk]; contract:
    ``kernels.reference.sampled_column_scores_reference``."""
    common = dict(rows=rows, q_first=q_first, kv_start=kv_start, window=window, scale=scale, sinks=sinks,
                  softcap=softcap)
    if _use_triton(query):
        from .kernels.sampling import sampled_column_scores_triton

        with _on_device(query):
            return sampled_column_scores_triton(query, key, **common)
    return sampled_column_scores_reference(query, key, **common)


def stripe_attention(query, key, value, *, mask, scale: float, tile: int = 256, sinks=None,
                     softcap=None) -> torch.Tensor:
    """Attention on a StripeMask (window + column stripes) -> [B, Lq, Hq, D]; contract:
    ``kernels.reference.stripe_attention_reference``."""
    if _use_triton(query):
        from .kernels.prefill import sparse_attention_triton

        with _on_device(query):
            return sparse_attention_triton(
                query, key, value, q_first=key.shape[2] - query.shape[2], k_pos=None, kv_start=mask.kv_start,
                streaming=torch.zeros(key.shape[1], dtype=torch.bool, device=query.device), sink=0, local=1,
                scale=scale, stripe_mask=mask, whole_block_share=cost.WHOLE_BLOCK_SHARE, sinks=sinks, softcap=softcap)
    return stripe_attention_reference(query, key, value, mask=mask, scale=scale, tile=tile, sinks=sinks,
                                      softcap=softcap)


# ----------------------------------------------------------------------------- torch.compile
# Under torch.compile the decode ops are registered operators (torch.library custom ops with fake
# implementations): dynamo sees one opaque call each, not the reference's host reads of device counters or the
# Triton launch code. Eager calls go straight to the implementations above, without the dispatcher.

_DECODE_KV_FIELDS = ("dense_key", "dense_value", "pages", "sink_key", "sink_value", "sink_pos", "ring_key",
                     "ring_value", "ring_pos")
_APPEND_BUFFERS = ("dense_key", "dense_value", "key_min", "key_max", "sink_key", "sink_value", "sink_pos",
                   "ring_key", "ring_value", "ring_pos")
Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


@torch.library.custom_op("sparse_attn_hf::paged_decode", mutates_args=())
def _paged_decode_op(query: Tensor, step: Tensor, head_kind: Tensor, head_slot: Tensor, dense_key: OptTensor,
                     dense_value: OptTensor, pages: OptTensor, sink_key: OptTensor, sink_value: OptTensor,
                     sink_pos: OptTensor, ring_key: OptTensor, ring_value: OptTensor, ring_pos: OptTensor,
                     kv_start: Tensor, page_size: int, sink: int, local: int, scale: float, sinks: OptTensor = None,
                     softcap: Optional[float] = None) -> Tensor:
    kv = DecodeKV(step=step, page_size=page_size, head_kind=head_kind, head_slot=head_slot, dense_key=dense_key,
                  dense_value=dense_value, pages=pages, sink_key=sink_key, sink_value=sink_value, sink_pos=sink_pos,
                  ring_key=ring_key, ring_value=ring_value, ring_pos=ring_pos)
    return _paged_decode(query, kv, kv_start=kv_start, sink=sink, local=local, scale=scale, sinks=sinks,
                         softcap=softcap)


@_paged_decode_op.register_fake
def _(query, *args):
    return torch.empty_like(query)


@torch.library.custom_op("sparse_attn_hf::physical_page_scores", mutates_args=("out",))
def _physical_page_scores_op(query: Tensor, key_min: Tensor, key_max: Tensor, kv_start: Tensor, seen: Tensor,
                             out: Tensor, reselect: Tensor, page_size: int, logical_page_size: int) -> None:
    _physical_page_scores(query, key_min, key_max, kv_start, seen, out, reselect, page_size, logical_page_size)


@_physical_page_scores_op.register_fake
def _(*args):
    return None


@torch.library.custom_op("sparse_attn_hf::top_pages", mutates_args=("out",))
def _top_pages_op(scores: Tensor, out: Tensor, reselect: Tensor) -> None:
    _top_pages(scores, out, reselect)


@_top_pages_op.register_fake
def _(*args):
    return None


@torch.library.custom_op("sparse_attn_hf::shortlist_pages", mutates_args=("out",))
def _shortlist_pages_op(query: Tensor, keys: Tensor, bound: Tensor, shortlist: Tensor, kv_start: Tensor, seen: Tensor,
                        out: Tensor, reselect: Tensor, page_size: int, scale: float,
                        softcap: Optional[float] = None) -> None:
    _shortlist_pages(query, keys, bound, shortlist, kv_start, seen, out, reselect, page_size, scale, softcap)


@_shortlist_pages_op.register_fake
def _(*args):
    return None


@torch.library.custom_op("sparse_attn_hf::append_token", mutates_args=_APPEND_BUFFERS)
def _append_token_op(key: Tensor, value: Tensor, dense_key: OptTensor, dense_value: OptTensor, key_min: OptTensor,
                     key_max: OptTensor, sink_key: OptTensor, sink_value: OptTensor, sink_pos: OptTensor,
                     ring_key: OptTensor, ring_value: OptTensor, ring_pos: OptTensor, seen: Tensor, kv_start: Tensor,
                     head_kind: Tensor, head_slot: Tensor, sink: int, logical_page_size: int) -> None:
    buffers = (dense_key, dense_value, key_min, key_max, sink_key, sink_value, sink_pos, ring_key, ring_value,
               ring_pos)
    tensors = {name: t for name, t in zip(_APPEND_BUFFERS, buffers) if t is not None}
    common = dict(kv_start=kv_start, head_kind=head_kind, head_slot=head_slot, sink=sink,
                  logical_page_size=logical_page_size)
    if _use_triton(key):
        _append_triton(key, value, tensors, seen=seen, **common)
    else:  # the kernel's reference (the CPU under torch.compile)
        append_token_reference(key, value, tensors, seen=int(seen), **common)


@_append_token_op.register_fake
def _(*args):
    return None
