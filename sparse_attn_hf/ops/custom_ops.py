"""The decode ops as torch.library operators (opaque calls with fake implementations), for Transformers' compiled
decode step: dynamo sees one call each, not the reference's host reads of device counters or the Triton launch code.
Eager calls go straight to the implementations in ``decode``, without the dispatcher."""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels.layout import DecodeKV
from ..kernels.reference import append_token_reference
from .decode import _APPEND_BUFFERS, _append_triton, _paged_decode, _physical_page_scores, _shortlist_pages, _top_pages
from .dispatch import _use_triton

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
