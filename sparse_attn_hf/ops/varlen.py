"""Attention over packed requests of different lengths (Transformers' continuous batching): flash's variable-length
kernel on CUDA (``torch.nn.attention.varlen.varlen_attn``: one launch for every request, the lengths read on the
device), the reference elsewhere (contract: ``kernels.reference.varlen_attention_reference``); and a decode step
read through the manager's block table (``block_table_decode``: the package's Triton kernel on CUDA, contract
``kernels.reference.block_table_decode_reference``)."""

from __future__ import annotations

import importlib.util

import torch

from ..kernels.decode_sdpa import block_table_decode_sdpa
from ..kernels.layout import BlockTableSelection, LogitTerms
from ..kernels.reference import block_table_decode_reference, varlen_attention_reference
from . import dispatch
from .dispatch import KERNEL_DTYPES, _on_device, _use_triton, check_dtype


def _varlen_takes_gqa() -> bool:
    """Whether this PyTorch's ``varlen_attn`` takes every argument ``varlen_attention`` passes (grouped-query heads,
    a window, the LSE, ``seqused_k``). torch 2.11's lacks ``enable_gqa``: there the per-request path serves."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:  # before PyTorch 2.9
        return False
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return {"enable_gqa", "window_size", "return_aux", "seqused_k"} <= set(inspect.signature(varlen_attn).parameters)


_HAS_VARLEN = _varlen_takes_gqa()


def varlen_available(tensor: torch.Tensor) -> bool:
    """Whether flash's variable-length kernel can take ``tensor``'s device and dtype here."""
    return tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and _HAS_VARLEN


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                     cu_k: torch.Tensor, max_q: int, max_k: int, *, scale: float, window: tuple[int, int] = (-1, -1),
                     used_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T_q, Hq, D], float32 LSE [T_q, Hq]) of packed requests (the reference's contract; ``max_q``/``max_k``:
    the longest request's rows and keys, host integers the caller knows without reading the device)."""
    if not varlen_available(query):
        return varlen_attention_reference(query, key, value, cu_q, cu_k, scale=scale, window=window, used_k=used_k)
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    out, lse = varlen_attn(query, key, value, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                           return_aux=AuxRequest(lse=True), scale=scale, window_size=window,
                           enable_gqa=query.shape[1] != key.shape[1],
                           seqused_k=None if used_k is None else used_k.to(torch.int32))
    if lse.shape[0] == query.shape[1]:  # flash's variable-length forward returns it [Hq, T_q]
        lse = lse.transpose(0, 1)
    return out, lse.float()


def block_table_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_pages: torch.Tensor,
                       v_pages: torch.Tensor, block_table: torch.Tensor, cu_k: torch.Tensor, head_kind: torch.Tensor,
                       *, sink: int, window: int, terms: LogitTerms,
                       selection: BlockTableSelection | None = None) -> torch.Tensor:
    """A decode step of packed requests over the manager's paged cache -> [R, Hq, D]: query [R, Hq, D], the new
    token's key/value [R, Hkv, D] (written into ``k_pages``/``v_pages`` [num_pages, P, Hkv, D] here), streaming KV
    heads (``head_kind`` 1) reading sink + the last ``window`` tokens, dense heads every token (where ``selection``
    selects: their listed pages and the tail). No host read."""
    check_dtype(query.dtype)
    rows, num_heads, head_dim = query.shape
    if key.shape != (rows, head_kind.shape[0], head_dim) or num_heads % key.shape[1] or value.shape != key.shape:
        raise ValueError(f"expected query [R, Hq, D] and new keys/values [R, {head_kind.shape[0]}, D], got "
                         f"{tuple(query.shape)} and {tuple(key.shape)} / {tuple(value.shape)}.")
    if k_pages.shape != v_pages.shape or k_pages.shape[2:] != key.shape[1:] or block_table.shape[0] < rows:
        raise ValueError(f"expected pages [num_pages, P, {key.shape[1]}, {head_dim}] and a block table row per "
                         f"request, got {tuple(k_pages.shape)} / {tuple(v_pages.shape)} and {tuple(block_table.shape)}.")
    if selection is not None:
        _check_selection(selection, rows, key.shape[1])
    if _use_triton(query):
        from ..kernels.block_table import block_table_decode_triton

        with _on_device(query):
            return block_table_decode_triton(query, key, value, k_pages, v_pages, block_table, cu_k.to(torch.int32),
                                             head_kind, sink=sink, window=window, terms=terms, selection=selection)
    if dispatch._backend == "auto" and terms.plain and not query.is_cuda:  # the CPU: SDPA over the same tokens
        return block_table_decode_sdpa(query, key, value, k_pages, v_pages, block_table, cu_k, head_kind, sink=sink,
                                       window=window, scale=terms.scale, selection=selection)
    return block_table_decode_reference(query, key, value, k_pages, v_pages, block_table, cu_k, head_kind, sink=sink,
                                        window=window, terms=terms, selection=selection)


def _check_selection(selection: BlockTableSelection, rows: int, num_kv: int) -> None:
    """Raise a ValueError naming what ``block_table_decode`` expects where ``selection``'s shapes or page size don't
    fit ``rows`` requests of ``num_kv`` KV heads."""
    pages, tail_first, page_size = selection.pages, selection.tail_first, selection.page_size
    if pages.dim() != 3 or pages.shape[:2] != (rows, num_kv) or tail_first.shape != (rows,):
        raise ValueError(f"expected a selection of pages [{rows}, {num_kv}, S] and tail_first [{rows}], got "
                         f"{tuple(pages.shape)} and {tuple(tail_first.shape)}.")
    if page_size <= 0 or page_size % 16:
        raise ValueError(f"expected a selection page size that is a positive multiple of 16, got {page_size}.")
