"""What every layer of one SparseCache shares: the padding, the sizes, where decoding starts, the decode step's
counters."""

from __future__ import annotations

import torch

from ..padding import left_padding_starts


class SequenceState:
    """What every layer of one SparseCache shares about the sequence: padding, sizes, where decoding
    starts. It refers to no layer and no cache (no reference cycle)."""

    def __init__(self, owner, capacity_hint: int | None):
        self.owner = owner  # the PatchState of the model the cache was made for
        self.capacity_hint = capacity_hint
        self.decode_from: int | None = None  # one-token forwards at slot >= this are decode steps
        self.decoding = False  # inside SparseCache.decoding() (a compiled decode step reads this, not decode_from)
        self.reset()

    def reset(self) -> None:
        self.kv_start: torch.Tensor | None = None
        self.max_kv_start = 0
        self._mask_seen = None  # the mask object already turned into kv_start in this forward
        self.counters: dict[str, torch.Tensor] = {}  # device -> the decode step's counters
        # device -> the owner of the decode steps there (``methods.decode_step.DecodePlan``): kept here so that it
        # lives and ends with the cache; the cache never calls it
        self.plans: dict[str, object] = {}

    def counters_on(self, device) -> torch.Tensor:
        """The decode-step counters on ``device`` (int32 [4], ``kernels.layout.STEP_*``): one tensor at a fixed
        address for the cache's life, shared by its layers there."""
        key = str(device)
        if key not in self.counters:
            self.counters[key] = torch.zeros(4, dtype=torch.int32, device=device)
        return self.counters[key]

    def is_decode_step(self, seen: int, q_len: int) -> bool:
        return q_len == 1 and self.decode_from is not None and seen >= self.decode_from

    def resolve_kv_start(self, attention_mask: torch.Tensor | None, batch: int, seen: int, q_len: int,
                         device) -> torch.Tensor:
        """First real slot of each row, checked against earlier forwards (once per mask object)."""
        if self.kv_start is not None and (attention_mask is None or attention_mask is self._mask_seen):
            return self.kv_start.to(device)
        starts = left_padding_starts(attention_mask, batch, seen + q_len, device)
        if self.kv_start is not None:
            old = self.kv_start.to(device)
            had_real = old < seen
            if not torch.equal(starts[had_real], old[had_real]):
                raise ValueError(
                    "the padding of the batch changed between calls on one SparseCache: continue with the "
                    "attention mask of the earlier call extended by ones for the new tokens."
                )
        self.kv_start = starts
        self.max_kv_start = int(starts.max())
        self._mask_seen = attention_mask
        return starts
