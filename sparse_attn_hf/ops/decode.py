"""Decode-step ops: the paged decode of one layer, page selection's two stages, storing a token. Each runs its
Triton kernel with its counters on the device (a CUDA graph replays it), else its reference; under torch.compile
each is one registered operator (``custom_ops``)."""

from __future__ import annotations

import torch

from .._log import warn_once
from ..kernels.decode_sdpa import paged_decode_sdpa
from ..kernels.layout import DecodeKV, LogitTerms, Visibility
from ..kernels.reference import (
    append_token_reference,
    paged_decode_reference,
    physical_page_scores_reference,
    shortlist_pages_reference,
    top_pages_reference,
)
from . import dispatch
from .dispatch import KERNEL_DTYPES, _decode_kernel_takes, _on_device, _selection_kernel_takes, _use_triton, check_dtype

DECODE_KV_FIELDS = ("head_kind", "head_slot", "dense_key", "dense_value", "pages", "sink_key", "sink_value",
                    "sink_pos", "ring_key", "ring_value", "ring_pos", "key_scale", "value_scale", "recent_key",
                    "recent_value")
_APPEND_BUFFERS = ("dense_key", "dense_value", "key_min", "key_max", "sink_key", "sink_value", "sink_pos",
                   "ring_key", "ring_value", "ring_pos", "key_scale", "value_scale", "recent_key", "recent_value")


def paged_decode(query: torch.Tensor, kv: DecodeKV, visible: Visibility, terms: LogitTerms) -> torch.Tensor:
    """One decode step of one layer over a SparseCache -> [B, Hq, D]. query [B, Hq, D] at slot
    ``kv.seen - 1``; ``visible``: kv_start, sink and the decode window (``local``); contract:
    ``kernels.reference.paged_decode_reference``."""
    check_dtype(query.dtype)
    if query.ndim != 3 or query.shape[1] % kv.head_kind.shape[0]:
        raise ValueError(f"expected query [B, Hq, D] with Hq a multiple of {kv.head_kind.shape[0]} KV heads, "
                         f"got {tuple(query.shape)}.")
    if torch.compiler.is_compiling():  # an opaque operator for torch.compile (below)
        return torch.ops.sparse_attn_hf.paged_decode(
            query, kv.step, [getattr(kv, f) for f in DECODE_KV_FIELDS], kv.page_size, visible.kv_start,
            visible.sink, visible.local, terms.scale, terms.sinks, terms.softcap)
    return _paged_decode(query, kv, visible, terms)


def _paged_decode(query, kv: DecodeKV, visible: Visibility, terms: LogitTerms) -> torch.Tensor:
    page = kv.page_size
    if _use_triton(query) and _decode_kernel_takes(page):
        from ..kernels.decode import paged_decode_triton

        with _on_device(query):
            return paged_decode_triton(query, kv, visible, terms)
    if query.is_cuda and dispatch._backend == "auto" and query.dtype in KERNEL_DTYPES:
        warn_once(f"sparse_attn_hf: page_size {page} is not a power of two >= 16: decoding runs the PyTorch reference.")
    if dispatch._backend == "auto" and terms.plain:
        return paged_decode_sdpa(query, kv, visible, terms.scale)
    return paged_decode_reference(query, kv, visible, terms)


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
        from ..kernels.selection import physical_page_scores_triton

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
    backend = dispatch._backend
    if scores.is_cuda and backend != "reference" or backend == "triton":  # float32 scores: any CUDA device
        from ..kernels.selection import top_pages_triton

        with _on_device(scores):
            top_pages_triton(scores, out=out, reselect=reselect)
        return
    if int(reselect):  # the reference path reads the host: a reusing step computes nothing
        out.copy_(top_pages_reference(scores, out.shape[2]))


def compile_top_pages(max_width: int, device: torch.device) -> None:
    """Compile the top-k kernel for rows of up to ``max_width`` pages ahead of use (a CUDA model's warm-up); a
    no-op where the reference runs."""
    if device.type == "cuda" and dispatch._backend != "reference":
        from ..kernels.selection import compile_top_pages as compile_ahead

        with torch.cuda.device(device):
            compile_ahead(max_width, device)


def shortlist_pages(query, keys, bound, shortlist, *, kv_start, seen: torch.Tensor, out: torch.Tensor,
                    reselect: torch.Tensor, page_size: int, scale: float, softcap: float | None = None,
                    key_scale: torch.Tensor | None = None, recent: torch.Tensor | None = None) -> torch.Tensor:
    """Page selection's second stage: the ``out.shape[2]`` pages of ``shortlist`` of highest exact attention mass
    written into ``out`` (int32) when ``reselect`` (int32 [1]) is set, else ``out`` is left as it is; ``seen``
    int32 [1]. Both live on the device. Contract: ``kernels.reference.shortlist_pages_reference`` with
    ``seen=int(seen)``, ``k=out.shape[2]``. FP8 pages: ``keys`` hold e4m3 codes, ``key_scale`` their scales,
    ``recent`` the ring of the newest tokens (``kernels.fp8``)."""
    if torch.compiler.is_compiling():
        torch.ops.sparse_attn_hf.shortlist_pages(query, keys, bound, shortlist, kv_start, seen, out, reselect,
                                                 page_size, scale, softcap, key_scale, recent)
        return out
    _shortlist_pages(query, keys, bound, shortlist, kv_start, seen, out, reselect, page_size, scale, softcap,
                     key_scale, recent)
    return out


def _shortlist_pages(query, keys, bound, shortlist, kv_start, seen, out, reselect, page_size: int, scale: float,
                     softcap: float | None, key_scale: torch.Tensor | None = None,
                     recent: torch.Tensor | None = None) -> None:
    common = dict(kv_start=kv_start, page_size=page_size, scale=scale, softcap=softcap, key_scale=key_scale,
                  recent=recent)
    if _use_triton(query) and _decode_kernel_takes(page_size) and query.shape[-1] >= 16:
        from ..kernels.selection import shortlist_pages_triton

        with _on_device(query):
            shortlist_pages_triton(query, keys, bound, shortlist, seen=seen, out=out, reselect=reselect, **common)
        return
    if int(reselect):  # the reference reads the host anyway (seen): a reusing step computes nothing
        out.copy_(shortlist_pages_reference(query, keys, bound, shortlist, seen=int(seen), k=out.shape[2], **common))


def append_token(key: torch.Tensor, value: torch.Tensor, tensors: dict, *, seen: torch.Tensor, kv_start: torch.Tensor,
                 head_kind: torch.Tensor, head_slot: torch.Tensor, sink: int, logical_page_size: int) -> None:
    """Store one decode token of every KV head in a SparseCache layer's buffers at slot ``seen - 1`` (``seen`` int32
    [1] on the device): one Triton launch, else the reference (``kernels.reference.append_token_reference``, which
    reads ``seen`` on the host)."""
    if torch.compiler.is_compiling():  # the registered operator, whatever runs inside it
        names = [name for name in _APPEND_BUFFERS if tensors.get(name) is not None]
        torch.ops.sparse_attn_hf.append_token(key, value, [tensors[name] for name in names], ",".join(names), seen,
                                              kv_start, head_kind, head_slot, sink, logical_page_size)
        return
    _append_token(key, value, tensors, seen, kv_start, head_kind, head_slot, sink, logical_page_size)


def _append_token(key, value, tensors: dict, seen, kv_start, head_kind, head_slot, sink: int,
                  logical_page_size: int) -> None:
    common = dict(kv_start=kv_start, head_kind=head_kind, head_slot=head_slot, sink=sink,
                  logical_page_size=logical_page_size)
    if _use_triton(key):
        from ..kernels.append import append_token_triton

        with _on_device(key):
            append_token_triton(key, value, tensors, seen=seen, **common)
    else:  # the kernel's reference (the CPU, also under torch.compile)
        append_token_reference(key, value, tensors, seen=int(seen), **common)
