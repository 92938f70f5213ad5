"""SparseCache: a Transformers ``Cache`` that stores each KV head the way its label needs.

Per layer:

* **dense KV heads** keep every token in pages of ``page_size`` tokens (64), each split into logical
  pages of ``logical_page_size`` (16). Pages of one batch row and head are consecutive in one
  preallocated buffer ``[B, H_dense, capacity, D]`` (``capacity`` a multiple of the page size), so a
  page is a view and never moves while the cache grows in place. ``generate()`` sizes the buffer for
  prompt + new tokens up front; past the capacity it doubles (one copy, amortized O(1) per token,
  never the per-token ``torch.cat`` of ``DynamicCache``). For every logical page the cache keeps the
  element-wise min and max of its real (non-pad) keys, ``[B, H_dense, capacity / 16, D]``, updated as
  tokens arrive (+inf / -inf where a page has no real key yet).
* **streaming KV heads** keep the first ``sink_size`` real tokens of each row and the last
  ``local_size`` tokens in a ring buffer of constant size; absolute slots are tracked.

Transformers calls ``update()`` before the attention function, without the padding mask. So
``update()`` returns a :class:`PendingKV` in place of the key tensor; the plugin's attention function,
which knows the padding, calls :meth:`SparseLayer.append` and attends to what it returns. A SparseCache
therefore only works with a model patched by ``patch_model``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops
from .kernels.reference import DecodeKV
from .methods.page_selection import select_pages
from .padding import left_padding_starts


@dataclass
class PendingKV:
    """New keys/values of one forward, waiting for the attention function to append them."""

    layer: "SparseLayer"
    key: torch.Tensor  # [B, Hkv, n, D], RoPE applied
    value: torch.Tensor


@dataclass
class LayerKV:
    """What one layer attends to after an append (``None`` for a head kind the layer lacks).

    ``dense_*``: [B, H_dense, seen, D], slots 0..seen-1 (views, no copy).
    ``stream_*``: [B, H_stream, n_s, D] with slots ``stream_pos`` [B, n_s] (-1: empty slot; ``None``:
    slots 0..n_s-1).
    """

    dense_key: torch.Tensor | None
    dense_value: torch.Tensor | None
    stream_key: torch.Tensor | None
    stream_value: torch.Tensor | None
    stream_pos: torch.Tensor | None

    @classmethod
    def split(cls, key: torch.Tensor, value: torch.Tensor, dense_idx, stream_idx) -> "LayerKV":
        """Full K/V [B, Hkv, L, D] (slots 0..L-1) split by head kind, as a cache-less layer sees it.
        A kind that has every head takes the tensors as they are (no copy)."""
        def pick(idx):
            return (key, value) if len(idx) == key.shape[1] else (key[:, idx], value[:, idx])

        dense = pick(dense_idx) if len(dense_idx) else (None, None)
        stream = (*pick(stream_idx), None) if len(stream_idx) else (None, None, None)
        return cls(*dense, *stream)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class SparseLayer(CacheLayerMixin):
    """Cache of one layer: paged dense heads with key statistics, ring-buffered streaming heads."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(
        self,
        cache: "SparseCache",
        dense_idx: torch.Tensor,
        stream_idx: torch.Tensor,
        *,
        sink_size: int,
        local_size: int,
        page_size: int,
        logical_page_size: int,
        token_budget: int,
        reuse_interval: int,
        decode_local_size: int,
    ):
        super().__init__()
        self.cache = cache
        self.dense_idx, self.stream_idx = dense_idx, stream_idx  # KV head indices of each kind
        self.sink_size, self.local_size = sink_size, local_size
        self.decode_local_size = min(decode_local_size, local_size)
        self.page_size, self.logical_page_size = page_size, logical_page_size
        self.token_budget, self.reuse_interval = token_budget, reuse_interval
        self.seen = 0
        self.capacity = 0
        self.steps_since_selection = 0  # decode steps that used the stored selection
        self._tensors: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ Cache API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, _, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.dense_idx, self.stream_idx = self.dense_idx.to(self.device), self.stream_idx.to(self.device)
        n_stream = len(self.stream_idx)
        new = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
        if n_stream:
            self._tensors.update(
                sink_key=new(batch, n_stream, self.sink_size, head_dim),
                sink_value=new(batch, n_stream, self.sink_size, head_dim),
                sink_pos=torch.full((batch, self.sink_size), -1, dtype=torch.long, device=self.device),
                ring_key=new(batch, n_stream, self.local_size, head_dim),
                ring_value=new(batch, n_stream, self.local_size, head_dim),
                ring_pos=torch.full((self.local_size,), -1, dtype=torch.long, device=self.device),
            )
        num_kv = len(self.dense_idx) + n_stream
        kind = torch.zeros(num_kv, dtype=torch.int32, device=self.device)
        kind[self.stream_idx] = 1
        slot = torch.zeros(num_kv, dtype=torch.int32, device=self.device)
        slot[self.dense_idx] = torch.arange(len(self.dense_idx), dtype=torch.int32, device=self.device)
        slot[self.stream_idx] = torch.arange(n_stream, dtype=torch.int32, device=self.device)
        self.head_kind, self.head_slot = kind, slot
        self.batch, self.head_dim = batch, head_dim
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Return a :class:`PendingKV` (twice, in the places of keys and values)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.batch:
            raise ValueError(
                f"this SparseCache holds batch size {self.batch}, the input has {key_states.shape[0]}: "
                "use a new SparseCache for another batch."
            )
        pending = PendingKV(self, key_states, value_states)
        return pending, pending

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._tensors.clear()
        self.seen = self.capacity = self.steps_since_selection = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "SparseCache cannot crop: streaming heads keep a ring buffer whose overwritten tokens are gone. "
            "Features that roll the cache back (assisted or prompt-lookup decoding) need "
            "generate(past_key_values=DynamicCache(config=model.config)) on the patched model."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def _map_batch(self, fn) -> None:
        for name, tensor in self._tensors.items():
            if name != "ring_pos":  # ring slots are shared by all rows
                self._tensors[name] = fn(tensor)
        if self.is_initialized:
            self.batch = len(fn(torch.arange(self.batch)))

    # --------------------------------------------------------------- storing
    def nbytes(self) -> int:
        """Bytes allocated by this layer (buffers at capacity, statistics and slot tables included)."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        hint = self.cache.capacity_hint or 0
        capacity = _round_up(max(needed, hint if self.capacity == 0 else 2 * self.capacity), self.page_size)
        n_dense = len(self.dense_idx)
        shape = (self.batch, n_dense, capacity, self.head_dim)
        stat_shape = (self.batch, n_dense, capacity // self.logical_page_size, self.head_dim)
        grown = {
            "dense_key": torch.zeros(shape, dtype=self.dtype, device=self.device),
            "dense_value": torch.zeros(shape, dtype=self.dtype, device=self.device),
            "key_min": torch.full(stat_shape, float("inf"), dtype=self.dtype, device=self.device),
            "key_max": torch.full(stat_shape, float("-inf"), dtype=self.dtype, device=self.device),
        }
        for name, tensor in grown.items():
            if name in self._tensors:
                old = self._tensors[name]
                tensor[:, :, : old.shape[2]] = old
            self._tensors[name] = tensor
        self.capacity = capacity

    def append(self, key: torch.Tensor, value: torch.Tensor, kv_start: torch.Tensor) -> LayerKV:
        """Store the new tokens (slots ``seen .. seen+n-1``) and return what the layer attends to."""
        n = key.shape[2]
        first = self.seen
        slots = torch.arange(first, first + n, device=key.device)
        dense = stream = None
        self._tensors.pop("pages", None)  # new prompt tokens: the next decode step selects anew
        if len(self.dense_idx):
            dense = self._append_dense(key[:, self.dense_idx], value[:, self.dense_idx], first, slots, kv_start)
        if len(self.stream_idx):
            self._resize_ring(self.local_size)
            stream = self._append_streaming(key[:, self.stream_idx], value[:, self.stream_idx], first, slots, kv_start)
        self.seen = first + n
        return LayerKV(*(dense or (None, None)), *(stream or (None, None, None)))

    def append_decode(self, key: torch.Tensor, value: torch.Tensor, kv_start: torch.Tensor,
                      query: torch.Tensor) -> DecodeKV:
        """Store one new token and return what the decode step reads: for dense heads the selected
        pages (selected anew every ``reuse_interval`` steps and after any prefill), for streaming heads
        sink + ring (the ring shrunk to the decode window). ``query`` [B, Hq, 1, D]."""
        first = self.seen
        kv = DecodeKV(seen=first + 1, page_size=self.page_size, head_kind=self.head_kind, head_slot=self.head_slot)
        t = self._tensors
        if len(self.dense_idx):
            self._ensure_capacity(first + 1)
        if len(self.stream_idx):
            self._resize_ring(self.decode_local_size)
        if not ops.append_token(key, value, t, slot=first, kv_start=kv_start, head_kind=self.head_kind,
                                head_slot=self.head_slot, sink=self.sink_size,
                                logical_page_size=self.logical_page_size):
            slots = torch.arange(first, first + 1, device=key.device)
            if len(self.dense_idx):
                self._append_dense(key[:, self.dense_idx], value[:, self.dense_idx], first, slots, kv_start)
            if len(self.stream_idx):
                self._append_streaming(key[:, self.stream_idx], value[:, self.stream_idx], first, slots, kv_start,
                                       view=False)
        if len(self.dense_idx):
            kv.dense_key, kv.dense_value = t["dense_key"], t["dense_value"]  # whole buffers: strides stay fixed
        if len(self.stream_idx):
            kv.sink_key, kv.sink_value, kv.sink_pos = t["sink_key"], t["sink_value"], t["sink_pos"]
            kv.ring_key, kv.ring_value, kv.ring_pos = t["ring_key"], t["ring_value"], t["ring_pos"]
        self.seen = first + 1
        if len(self.dense_idx):
            if "pages" not in t or self.steps_since_selection >= self.reuse_interval:
                groups = query.shape[1] // len(self.head_kind)
                grouped = query.view(self.batch, len(self.head_kind), groups, self.head_dim)
                t["pages"], self.tail_first = select_pages(
                    grouped.index_select(1, self.dense_idx), t["key_min"], t["key_max"], kv_start=kv_start,
                    seen=self.seen, budget=self.token_budget, page_size=self.page_size,
                    logical_page_size=self.logical_page_size)
                self.steps_since_selection = 0
            self.steps_since_selection += 1
            kv.pages, kv.tail_first = t["pages"], self.tail_first
        return kv

    def _append_dense(self, key, value, first: int, slots, kv_start):
        n = key.shape[2]
        self._ensure_capacity(first + n)
        t = self._tensors
        t["dense_key"][:, :, first : first + n] = key
        t["dense_value"][:, :, first : first + n] = value
        # logical-page statistics over real tokens only
        is_pad = (slots[None, :] < kv_start[:, None])[:, None, :, None]  # [B, 1, n, 1]
        page = (slots // self.logical_page_size).view(1, 1, n, 1).expand_as(key)
        inf = torch.tensor(float("inf"), dtype=key.dtype, device=key.device)
        t["key_min"].scatter_reduce_(2, page, torch.where(is_pad, inf, key), reduce="amin")
        t["key_max"].scatter_reduce_(2, page, torch.where(is_pad, -inf, key), reduce="amax")
        end = first + n
        return t["dense_key"][:, :, :end], t["dense_value"][:, :, :end]

    def _resize_ring(self, size: int) -> None:
        """Give the ring ``size`` slots, keeping the newest tokens that fit (slot p at index p % size)."""
        t = self._tensors
        if t["ring_key"].shape[2] == size:
            return
        old_pos = t["ring_pos"]
        keep = torch.nonzero((old_pos >= 0) & (old_pos >= self.seen - size)).flatten()
        new_index = old_pos[keep] % size
        for name in ("ring_key", "ring_value"):
            old = t[name]
            grown = old.new_zeros(*old.shape[:2], size, old.shape[3])
            grown[:, :, new_index] = old[:, :, keep]
            t[name] = grown
        t["ring_pos"] = torch.full((size,), -1, dtype=old_pos.dtype, device=old_pos.device)
        t["ring_pos"][new_index] = old_pos[keep]

    def _append_streaming(self, key, value, first: int, slots, kv_start, view: bool = True):
        t = self._tensors
        batch, n = key.shape[0], key.shape[2]
        ring_size = t["ring_key"].shape[2]
        if first == 0 or not view:  # nothing cached yet: attend to the new tokens alone
            view = key, value, None
        else:
            new_pos = slots[None, :].expand(batch, n)
            # ring tokens that are also sink tokens of their row are already in the sink buffer
            ring_pos = t["ring_pos"][None, :].expand(batch, -1)
            ring_pos = torch.where(ring_pos - kv_start[:, None] < self.sink_size, -1, ring_pos)
            view = (
                torch.cat([t["sink_key"], t["ring_key"], key], dim=2),
                torch.cat([t["sink_value"], t["ring_value"], value], dim=2),
                torch.cat([t["sink_pos"], ring_pos, new_pos], dim=1),
            )
        # sinks: the first sink_size real tokens of each row
        if self.sink_size and first < self.cache.max_kv_start + self.sink_size:
            rel = slots[None, :] - kv_start[:, None]
            rows, cols = torch.nonzero((rel >= 0) & (rel < self.sink_size), as_tuple=True)
            sink_slot = rel[rows, cols]
            t["sink_key"][rows, :, sink_slot] = key[rows, :, cols]
            t["sink_value"][rows, :, sink_slot] = value[rows, :, cols]
            t["sink_pos"][rows, sink_slot] = slots[cols]
        # ring: the last ring_size tokens, slot p at index p % ring_size
        keep = min(n, ring_size)
        ring_slots = slots[n - keep :]
        index = ring_slots % ring_size
        t["ring_key"].index_copy_(2, index, key[:, :, n - keep :])
        t["ring_value"].index_copy_(2, index, value[:, :, n - keep :])
        t["ring_pos"].index_copy_(0, index, ring_slots)
        return view


class SparseCache(Cache):
    """The plugin's KV cache for a patched model (see the module docstring for the layout).

    Args:
        model: a model patched by ``patch_model``; the cache follows its head labels and settings.
        max_cache_len: tokens to allocate for dense heads up front (``generate()`` passes prompt +
            new tokens); the buffer doubles past it.

    Example:
        >>> cache = SparseCache(model)
        >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
        >>> cache.nbytes(), cache.dynamic_cache_nbytes()
    """

    def __init__(self, model, max_cache_len: int | None = None):
        state = getattr(model, "_sparse_attn_state", None)
        if state is None:
            raise ValueError("SparseCache needs a patched model: call sparse_attn_hf.patch_model(model) first.")
        settings = state.settings
        layers = [
            SparseLayer(
                self,
                *state.head_split(layer),
                sink_size=settings.sink_size,
                local_size=settings.local_size,
                page_size=settings.page_size,
                logical_page_size=settings.logical_page_size,
                token_budget=settings.token_budget,
                reuse_interval=settings.reuse_interval,
                decode_local_size=settings.decode_local_size,
            )
            for layer in range(state.streaming.shape[0])
        ]
        super().__init__(layers=layers)
        self.capacity_hint = max_cache_len  # not "max_cache_len": a read-only property of Cache in some 5.x
        self.owner = state
        self.kv_start: torch.Tensor | None = None
        self.max_kv_start = 0
        self._mask_seen = None  # the mask object already turned into kv_start in this forward

    def resolve_kv_start(self, attention_mask: torch.Tensor | None, layer: SparseLayer, q_len: int) -> torch.Tensor:
        """First real slot of each row, checked against earlier forwards (once per mask object)."""
        device = layer.device
        if self.kv_start is not None and (attention_mask is None or attention_mask is self._mask_seen):
            return self.kv_start.to(device)
        seen = layer.seen
        starts = left_padding_starts(attention_mask, layer.batch, seen + q_len, device)
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

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.kv_start is not None:
            self.kv_start = self.kv_start.index_select(0, beam_idx.to(self.kv_start.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.kv_start is not None:
            self.kv_start = self.kv_start.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.kv_start is not None:
            self.kv_start = self.kv_start[indices]

    def reset(self):
        super().reset()
        self.kv_start, self.max_kv_start, self._mask_seen = None, 0, None

    def nbytes(self) -> int:
        """Bytes allocated by the cache (capacity, page statistics and slot tables included)."""
        return sum(layer.nbytes() for layer in self.layers)

    def dynamic_cache_nbytes(self) -> int:
        """Bytes a ``DynamicCache`` would hold for the same tokens (all heads, all tokens, K and V)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                heads = len(layer.dense_idx) + len(layer.stream_idx)
                total += 2 * layer.batch * heads * layer.seen * layer.head_dim * layer.dtype.itemsize
        return total
