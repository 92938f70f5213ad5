"""The data layouts kernels and their references share (imported by both sides, and by the cache that fills them):
a decode step's counters and what a decode step of one layer reads (``DecodeKV``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    @property
    def seen(self) -> int:
        return int(self.step[STEP_SEEN])

    @property
    def tail_first(self) -> int:
        return int(self.step[STEP_TAIL])
