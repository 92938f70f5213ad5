"""What the attention reads from a SparseCache in a prefill: the new tokens waiting to be stored (``PendingKV``) and
what one layer attends to (``LayerKV``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PendingKV:
    """New keys/values of one forward, waiting for the attention function to append them."""

    layer: object  # the SparseLayer that stores them (``cache.layer``, which builds this view)
    key: torch.Tensor  # [B, Hkv, n, D], RoPE applied
    value: torch.Tensor


@dataclass
class LayerKV:
    """What one layer attends to in prefill (``None`` for a head kind the layer lacks).

    ``dense_key``/``dense_value``: [B, H_dense, Lk, D], the dense heads only, slots 0..Lk-1.
    ``stream_key``/``stream_value``: [B, n, n_s, D] with slots ``stream_pos`` [B, n_s] (-1: empty slot;
    ``None``: slots 0..n_s-1). ``stream_all_heads``: the tensors hold every KV head of the layer (n = Hkv,
    the streaming heads are picked by index, no copy); otherwise only the streaming heads, in order.
    ``stream_first`` (with ``stream_pos`` None): the tensors hold each row's sink tokens, then consecutive
    slots up to the last new token, none of them padding; the first query sits at index ``stream_first``
    of them. Attention then runs in these coordinates (no padding: every row starts at 0), where the
    kernel visits only the sink's and the window's key blocks.
    """

    dense_key: torch.Tensor | None
    dense_value: torch.Tensor | None
    stream_key: torch.Tensor | None
    stream_value: torch.Tensor | None
    stream_pos: torch.Tensor | None
    stream_all_heads: bool = False
    stream_first: int | None = None

    @classmethod
    def split(cls, key: torch.Tensor, value: torch.Tensor, dense_idx, stream_idx) -> "LayerKV":
        """Full K/V [B, Hkv, L, D] (slots 0..L-1), as a cache-less layer sees it. Dense heads are copied
        out only when the layer also has streaming heads; streaming heads are read in place."""
        dense = (None, None)
        if len(dense_idx):
            # index_select, not key[:, dense_idx]: on a strided view (a request of a packed batch) advanced indexing
            # took 6 ms per call on the CPU, index_select 4 us
            dense = (key, value) if len(dense_idx) == key.shape[1] else (key.index_select(1, dense_idx),
                                                                         value.index_select(1, dense_idx))
        stream = (key, value, None, True) if len(stream_idx) else (None, None, None, False)
        return cls(*dense, *stream)
