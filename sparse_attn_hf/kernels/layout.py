"""The values kernels and their references share (imported by both sides, by the ops between them, and by the cache
that fills them): what a query sees (``Visibility``), how a score becomes a logit (``LogitTerms``), a decode
step's counters and what a decode step of one layer reads (``DecodeKV``), and the pages a continuous batch's dense
heads read in a decode step (``BlockTableSelection``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Visibility:
    """Which keys each query of one attention call sees, and which heads the call attends: one value passed whole
    from the attention to the ops, kernels and references (the rule is ``kernels.reference``'s docstring).

    ``kv_start`` [B]: row ``b``'s real tokens start at slot ``kv_start[b]`` (left padding). ``streaming`` [n] bool,
    one flag per attended KV head (None: every head dense); a streaming head sees the first ``sink`` real tokens
    and the ``local`` newest. Prefill: query ``i`` sits at slot ``q_first + i``, key ``j`` at ``k_pos[b, j]`` (None:
    slot ``j``). Decode: the query sits at the newest slot; ``DecodeKV`` says which heads stream. ``heads`` (int64
    [n]) restricts a prefill call to the query heads of those KV-head groups (``groups`` query heads each, query
    head ``h * groups + g`` of KV head ``h``); key/value then hold those n heads in order, or every KV head when
    ``key_all_heads``.
    """

    kv_start: torch.Tensor
    streaming: torch.Tensor | None = None
    sink: int = 0
    local: int = 0
    q_first: int = 0
    k_pos: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    groups: int | None = None
    key_all_heads: bool = False

    def but(self, **changes) -> "Visibility":
        """This visibility with some fields changed."""
        return replace(self, **changes)

    def streaming_flags(self, n: int, device) -> torch.Tensor:
        """``streaming``, or n False flags (every head dense) where it is None."""
        return torch.zeros(n, dtype=torch.bool, device=device) if self.streaming is None else self.streaming


@dataclass(frozen=True)
class LogitTerms:
    """How a query-key product becomes a softmax logit: times ``scale``; then, in some families, soft-capped
    (Gemma 2: ``softcap * tanh(s / softcap)``) and joined by one learned sink logit per query head in the
    denominator (GPT-OSS: ``sinks`` float [Hq], no value). SDPA computes only the scale (``plain``)."""

    scale: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.sinks is None

    def with_sinks(self, sinks: torch.Tensor | None) -> "LogitTerms":
        """The same terms for other query heads (their sinks in order, e.g. a call's gathered heads)."""
        return replace(self, sinks=sinks)


@dataclass(frozen=True)
class BlockTableSelection:
    """Which tokens each dense KV head of a request reads in a decode step over Transformers' block table (the rule
    is ``kernels.reference.block_table_decode_reference``'s docstring). Pages count the request's own positions:
    page ``j`` holds its positions ``j * page_size .. j * page_size + page_size - 1``, whatever the pool's page size.

    ``pages`` int32 [R, Hkv, S]: the pages each KV head reads (-1: none), distinct and before ``tail_first``.
    ``tail_first`` int32 [R]: the request's first page read whole, every later position with it (-1: every
    position, no page selected). ``page_size``: a multiple of 16 (a python int).
    """

    pages: torch.Tensor
    tail_first: torch.Tensor
    page_size: int


# a decode step's counters (int32, on the device): tokens stored, steps before the next page selection,
# whether this step selects, and the first page attended whole (the tail)
STEP_SEEN, STEP_DUE, STEP_RESELECT, STEP_TAIL = range(4)


def step_counters(seen: int, tail_first: int = 0, device=None) -> torch.Tensor:
    """A step tensor (see ``DecodeKV``) with these counters: for tests and benchmarks that build a step."""
    return torch.tensor([seen, 0, 0, tail_first], dtype=torch.int32, device=device)


def reset_step(step: torch.Tensor, seen: int) -> None:
    """The counters after a prefill of ``seen`` tokens: the next decode step selects anew (no host sync)."""
    step.zero_()
    step[STEP_SEEN : STEP_SEEN + 1].fill_(seen)


@dataclass
class DecodeKV:
    """What one decode step of a layer reads from a :class:`~sparse_attn_hf.SparseCache` (views, no copies).

    ``step`` (int32 [4], on the device; ``STEP_*`` index it) holds the step's counters: ``seen`` tokens
    stored, this one included, and ``tail_first``. Kernels read them there, not from the host, so that a
    CUDA graph can replay a step; the reference reads them through the properties of the same names.
    Dense KV heads: ``dense_key``/``dense_value`` [B, Hd, capacity, D], slots 0..seen-1 filled. They see
    the physical pages listed in ``pages`` [B, Hd, n] (int32, -1 for none) plus every page from
    ``tail_first`` to the newest; ``tail_first`` 0 is exact dense attention (``pages`` then unread).
    Streaming KV heads: the sink buffer ``sink_*`` [B, Hs, S, D] with slots ``sink_pos`` [B, S] and the
    ring ``ring_*`` [B, Hs, R, D] with slots ``ring_pos`` [R] (-1: empty); a ring token also in the
    sink (slot - kv_start < sink) counts once, from the sink buffer.
    ``head_kind`` [Hkv] int32 (0 dense, 1 streaming) and ``head_slot`` [Hkv] int32 (index in its
    kind's buffers) map KV heads to buffers.
    FP8 pages (``key_scale`` not None, ``kernels.fp8``): ``dense_key``/``dense_value`` hold e4m3 codes of the sealed
    pages, ``key_scale``/``value_scale`` float32 [B, Hd, capacity / page_size] their scales, and the newest pages are
    in the ring ``recent_key``/``recent_value`` [B, Hd, R, D] (slot ``p`` at ``p % R``), the model's dtype.
    """

    step: torch.Tensor
    page_size: int
    head_kind: torch.Tensor
    head_slot: torch.Tensor
    dense_key: torch.Tensor | None = None
    dense_value: torch.Tensor | None = None
    pages: torch.Tensor | None = None
    sink_key: torch.Tensor | None = None
    sink_value: torch.Tensor | None = None
    sink_pos: torch.Tensor | None = None
    ring_key: torch.Tensor | None = None
    ring_value: torch.Tensor | None = None
    ring_pos: torch.Tensor | None = None
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    recent_key: torch.Tensor | None = None
    recent_value: torch.Tensor | None = None

    @property
    def seen(self) -> int:
        return int(self.step[STEP_SEEN])

    @property
    def tail_first(self) -> int:
        return int(self.step[STEP_TAIL])
