"""The decode ops as torch.library operators (opaque calls with fake implementations), for Transformers' compiled
decode step: dynamo sees one call each, not the reference's host reads of device counters or the Triton launch code.
Eager calls go straight to the implementations in ``decode``, without the dispatcher."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..kernels.layout import DecodeKV, LogitTerms, Visibility
from .decode import DECODE_KV_FIELDS, _append_token, _paged_decode, _physical_page_scores, _shortlist_pages, _top_pages

Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


# A decode step's values cross the operator boundary flat (a schema takes tensors, numbers and lists of them): the
# DecodeKV's tensors as one list in the order of ``DECODE_KV_FIELDS``, the visibility and logit terms as scalars.
@torch.library.custom_op("sparse_attn_hf::paged_decode", mutates_args=())
def _paged_decode_op(query: Tensor, step: Tensor, kv_tensors: Sequence[OptTensor], page_size: int, kv_start: Tensor,
                     sink: int, local: int, scale: float, sinks: OptTensor = None,
                     softcap: Optional[float] = None) -> Tensor:
    kv = DecodeKV(step=step, page_size=page_size, **dict(zip(DECODE_KV_FIELDS, kv_tensors)))
    return _paged_decode(query, kv, Visibility(kv_start, sink=sink, local=local), LogitTerms(scale, softcap, sinks))


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
                        softcap: Optional[float] = None, key_scale: OptTensor = None,
                        recent: OptTensor = None) -> None:
    _shortlist_pages(query, keys, bound, shortlist, kv_start, seen, out, reselect, page_size, scale, softcap,
                     key_scale, recent)


@_shortlist_pages_op.register_fake
def _(*args):
    return None


# The buffers a token is stored in: the layer's present ones as one mutated list, named in ``names`` (comma-separated;
# a list of optional tensors cannot be declared mutated: torch 2.13's functionalization fails on it).
@torch.library.custom_op("sparse_attn_hf::append_token", mutates_args=("buffers",))
def _append_token_op(key: Tensor, value: Tensor, buffers: Sequence[Tensor], names: str, seen: Tensor, kv_start: Tensor,
                     head_kind: Tensor, head_slot: Tensor, sink: int, logical_page_size: int) -> None:
    _append_token(key, value, dict(zip(names.split(","), buffers)), seen, kv_start, head_kind, head_slot, sink,
                  logical_page_size)


@_append_token_op.register_fake
def _(*args):
    return None
