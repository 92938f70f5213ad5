"""One layer of a SparseCache: paged dense heads with their page statistics, ring-buffered streaming heads, and the
buffers a decode step writes (see the package docstring for the layout)."""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import ops
from .._log import warn_once
from ..kernels.fp8 import FP8, check_device, recent_tokens
from ..kernels.layout import STEP_SEEN, STEP_TAIL, DecodeKV
from .fp8_pages import FP8Pages
from .sequence import SequenceState
from .views import LayerKV, PendingKV

_STAT_CHUNK_PAGES = 1024  # logical pages whose statistics are computed per step (bounds the temporary memory)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def head_runs(heads: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive runs of ``heads`` as (first head, end head, index of the run's first head in ``heads``)."""
    runs = []
    for i, head in enumerate(heads):
        if runs and runs[-1][1] == head:
            runs[-1] = (runs[-1][0], head + 1, runs[-1][2])
        else:
            runs.append((head, head + 1, i))
    return runs


class SparseLayer(FP8Pages, CacheLayerMixin):
    """Cache of one layer: paged dense heads with key statistics, ring-buffered streaming heads."""

    is_compileable = False  # per cache: True with SparseConfig(decode_compile=True), see __init__
    is_croppable = False
    is_sliding = False

    def __init__(
        self,
        sequence: SequenceState,
        layer_idx: int,
        dense_heads: list[int],
        stream_heads: list[int],
        *,
        sink_size: int,
        local_size: int,
        page_size: int,
        logical_page_size: int,
        token_budget: int,
        reuse_interval: int,
        decode_local_size: int,
        shortlist: int = 1,
        compiled_decode: bool = False,
        kv_dtype: str = "auto",
    ):
        super().__init__()
        self.sequence = sequence
        self.layer_idx = layer_idx
        self.dense_heads, self.stream_heads = list(dense_heads), list(stream_heads)  # KV head indices of each kind
        self.sink_size, self.local_size = sink_size, local_size
        self.decode_local_size = min(decode_local_size, local_size)
        self.page_size, self.logical_page_size = page_size, logical_page_size
        self.token_budget, self.reuse_interval, self.shortlist = token_budget, reuse_interval, shortlist
        self.fp8 = kv_dtype == "fp8"  # sealed dense pages in e4m3 + a scale per page and head (kernels.fp8)
        # Transformers' own decode compile (SparseConfig(decode_compile=True)): a compiled step reads no host
        # value that changes per step or per prompt, so buffers are sized in powers of two before decoding and
        # the tokens stored advance on the device only (``seen`` catches up when read on the host)
        self.is_compileable = compiled_decode
        self._seen, self._device_ahead = 0, False
        self.capacity = 0
        self._tensors: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ Cache API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, _, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.fp8:
            check_device(self.device)  # the model may have moved since patch_model checked
            if self.device.type != "cuda":
                warn_once("sparse_attn_hf: kv_dtype='fp8' on a CPU stores e4m3 pages but has no kernel to read them: "
                          "each decode step reads the pages back in the model's dtype (the reference), slower than "
                          "kv_dtype='auto' and with a temporary of their size. FP8 pages pay on CUDA.")
        # index tables of the model's head labels, on this device (shared, built once per model)
        self.dense_idx, self.stream_idx, self.head_kind, self.head_slot = self.sequence.owner.head_tables(
            self.layer_idx, self.device)
        n_stream = len(self.stream_heads)
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
        self.step = self.sequence.counters_on(self.device)
        self.batch, self.head_dim = batch, head_dim
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Return a :class:`PendingKV` (twice, in the places of keys and values)."""
        if not self.sequence.owner.active:
            raise ValueError(
                "this SparseCache can only be read by sparse_attn_hf's attention, and the model it was made for no "
                "longer runs it (unpatch_model, or set_attn_implementation after patching): use a new DynamicCache, "
                "or patch the model again and create a new SparseCache(model)."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.batch:
            raise ValueError(
                f"this SparseCache holds batch size {self.batch}, the input has {key_states.shape[0]}: "
                "use a new SparseCache for another batch."
            )
        pending = PendingKV(self, key_states, value_states)
        return pending, pending

    @property
    def seen(self) -> int:
        """Tokens stored. After compiled decode steps (which advance only the device counter) the first read
        on the host synchronizes once."""
        if self._device_ahead:
            self._seen, self._device_ahead = int(self.step[STEP_SEEN]), False
        return self._seen

    @seen.setter
    def seen(self, value: int) -> None:
        self._seen, self._device_ahead = value, False

    def get_seq_length(self):
        if torch.compiler.is_compiling() and self.is_compileable and self.is_initialized:
            return self.step[STEP_SEEN]  # a tensor, as Transformers' StaticLayer returns: no per-step guard
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if torch.compiler.is_compiling() and self.is_compileable:
            return self.capacity, 0  # a compiled decode step takes no mask (the padding is kv_start)
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._tensors.clear()
        self.seen = self.capacity = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "SparseCache cannot crop: streaming heads keep a ring buffer whose overwritten tokens are gone. "
            "The patched generate() runs the features that roll the cache back (assisted or prompt-lookup "
            "decoding) as stock Transformers, with a cache of its own: call it without this SparseCache."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def _map_batch(self, fn) -> None:
        for name, tensor in self._tensors.items():
            if name != "ring_pos":  # ring slots are shared by all rows
                self._tensors[name] = fn(tensor)
        if self.is_initialized:
            self.batch = len(fn(torch.arange(self.batch, device=self.device)))

    @property
    def tail_first(self) -> int:
        """The first page the last decode step read whole (0: all of them); for inspection (it reads the
        device's counter, a host synchronization)."""
        return int(self.step[STEP_TAIL])

    # --------------------------------------------------------------- storing
    def nbytes(self) -> int:
        """Bytes allocated by this layer (buffers at capacity, statistics and slot tables included)."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        hint = self.sequence.capacity_hint or 0  # generate(): prompt + new tokens, continuations included
        if hint < needed:  # no hint covers it: double (amortized O(1) per token), or what is needed
            if self.capacity:
                warn_once("sparse_attn_hf: a SparseCache grows past the length it was sized for (one copy of its "
                          "dense heads' buffers; decode steps after it run eagerly, not from a CUDA graph): pass "
                          "max_cache_len to SparseCache, or max_new_tokens to generate().")
            hint = max(needed, 2 * self.capacity)
        capacity = _round_up(hint, self.page_size)
        if self.is_compileable:  # one size for every prompt of a bucket: compiled steps see the same shapes
            capacity = max(self.page_size, 1 << (capacity - 1).bit_length())
        n_dense = len(self.dense_heads)
        shape = (self.batch, n_dense, capacity, self.head_dim)
        stat_shape = (self.batch, n_dense, capacity // self.logical_page_size, self.head_dim)
        stored = FP8 if self.fp8 else self.dtype
        grown = {
            "dense_key": torch.zeros(shape, dtype=stored, device=self.device),
            "dense_value": torch.zeros(shape, dtype=stored, device=self.device),
            "key_min": torch.full(stat_shape, float("inf"), dtype=self.dtype, device=self.device),
            "key_max": torch.full(stat_shape, float("-inf"), dtype=self.dtype, device=self.device),
        }
        if self.fp8:
            pages = (self.batch, n_dense, capacity // self.page_size)
            grown.update(key_scale=torch.zeros(pages, dtype=torch.float32, device=self.device),
                         value_scale=torch.zeros(pages, dtype=torch.float32, device=self.device))
            for name in ("recent_key", "recent_value"):  # the newest pages, in the model's dtype (kernels.fp8)
                self._tensors.setdefault(name, torch.zeros(self.batch, n_dense, recent_tokens(self.page_size),
                                                           self.head_dim, dtype=self.dtype, device=self.device))
        for name, tensor in grown.items():
            if name in self._tensors:
                old = self._tensors.pop(name)  # dropped before the next buffer grows: one old buffer at a time
                tensor[:, :, : old.shape[2]] = old
                del old
            self._tensors[name] = tensor
        self.capacity = capacity

    def append(self, key: torch.Tensor, value: torch.Tensor, kv_start: torch.Tensor, ring: int | None = None) -> LayerKV:
        """Store the new tokens (slots ``seen .. seen+n-1``, all KV heads [B, Hkv, n, D]) and return what the
        layer attends to in prefill. ``ring``: keep at least this many newest tokens of the streaming heads (a
        prompt run dense: its later chunks attend to all of it); the decode window shrinks it again."""
        n = key.shape[2]
        first = self.seen
        dense = stream = None
        self._tensors.pop("pages", None)
        if self.dense_heads:
            dense = self._append_dense(key, value, first, kv_start)
        if self.stream_heads:
            self._resize_ring(max(self.local_size, ring or 0))
            stream = self._append_streaming(key, value, first, kv_start)
        self.seen = first + n
        if self.is_compileable and self.sequence.decoding and self.seen >= self.sequence.decode_from:
            self.prepare_decode()
        return LayerKV(*(dense or (None, None)), *(stream or (None, None, None, False, None)))

    def prepare_decode(self) -> None:
        """Size what decode steps write (the buffers for the capacity hint, the decode window, the page scores)
        before a compiled step, which must not allocate or read the host length."""
        if self.dense_heads:
            self._ensure_capacity(max(self.seen + 1, self.sequence.capacity_hint or 0))
            self.selection_buffers()
        if self.stream_heads:
            self._resize_ring(self.decode_local_size)
        for tensor in (*self._tensors.values(), self.step):  # written in place by every step: CUDA graphs of a
            torch._dynamo.mark_static_address(tensor)  # compiled step keep their addresses, as for StaticCache

    def append_decode(self, key: torch.Tensor, value: torch.Tensor, kv_start: torch.Tensor) -> DecodeKV:
        """Store one new token and return what a decode step reads: the dense heads' buffers (the pages to
        read are chosen by ``methods.page_selection``; see :meth:`selection_buffers`), and for streaming heads
        sink + ring (the ring shrunk to the decode window).

        The step's counters live on the device (``self.step``, advanced before this call by the decode step's
        owner, ``methods.decode_step.DecodePlan``): the append kernel reads the slot there. Once the buffers are
        sized (the first decode step after a prefill may grow them) a step does no host work that depends on
        its position. Compiled (``decode_compile``): sized beforehand (:meth:`prepare_decode`), the token
        stored by the registered append operator, the host length left to catch up."""
        compiled = torch.compiler.is_compiling()
        first = None if compiled else self.seen
        t = self._tensors
        if not compiled:
            if self.dense_heads:
                self._ensure_capacity(first + 1)
            if self.stream_heads:
                self._resize_ring(self.decode_local_size)
        kv = DecodeKV(step=self.step, page_size=self.page_size, head_kind=self.head_kind, head_slot=self.head_slot)
        ops.append_token(key, value, t, seen=self.step[STEP_SEEN : STEP_SEEN + 1], kv_start=kv_start,
                         head_kind=self.head_kind, head_slot=self.head_slot, sink=self.sink_size,
                         logical_page_size=self.logical_page_size)
        if self.dense_heads:
            kv.dense_key, kv.dense_value = t["dense_key"], t["dense_value"]  # whole buffers: strides stay fixed
            if self.fp8:
                kv.key_scale, kv.value_scale = t["key_scale"], t["value_scale"]
                kv.recent_key, kv.recent_value = t["recent_key"], t["recent_value"]
        if self.stream_heads:
            kv.sink_key, kv.sink_value, kv.sink_pos = t["sink_key"], t["sink_value"], t["sink_pos"]
            kv.ring_key, kv.ring_value, kv.ring_pos = t["ring_key"], t["ring_value"], t["ring_pos"]
        if compiled:
            self._device_ahead = True  # a store, not a read: no guard on the length
        else:
            self.seen = first + 1
        return kv

    def selection_buffers(self) -> dict:
        """What page selection reads and keeps for the dense heads: the logical-page statistics, the stored
        keys, the bound's page scores (float32 [B, Hd, capacity / page_size], sized with the buffers), the
        selection kept between steps (int32 [B, Hd, budget / page_size - 1]) and the short list of a two-stage
        selection (int32, ``shortlist`` x as many, or None), and the last selection an evaluation hook made (or
        None)."""
        t = self._tensors
        width = self.capacity // self.page_size
        if t.get("page_scores") is None or t["page_scores"].shape[2] != width:
            t["page_scores"] = torch.full((self.batch, len(self.dense_heads), width), float("-inf"),
                                          dtype=torch.float32, device=self.device)
        chosen = self.token_budget // self.page_size - 1
        if "selected" not in t:
            for name, n in (("selected", chosen), ("listed", self.shortlist * chosen if self.shortlist > 1 else 0)):
                if n:
                    t[name] = torch.full((self.batch, len(self.dense_heads), n), -1, dtype=torch.int32,
                                         device=self.device)
        return {"key_min": t["key_min"], "key_max": t["key_max"], "keys": t["dense_key"],
                "key_scale": t.get("key_scale"), "recent_key": t.get("recent_key"), "scores": t["page_scores"],
                "selected": t["selected"], "listed": t.get("listed"), "pages": t.get("pages")}

    def keep_pages(self, pages: torch.Tensor) -> None:
        """Store the pages a decode step reads (int32 [B, Hd, n]; for evaluation hooks); a prefill drops them.
        Not in a compiled step: a graph's output must not outlive the step."""
        if not torch.compiler.is_compiling():
            self._tensors["pages"] = pages

    def _append_dense(self, key, value, first: int, kv_start):
        """Copy the dense heads of ``key``/``value`` [B, Hkv, n, D] into the paged buffers (one copy per run of
        consecutive heads, no gathered temporary) and refresh the statistics of the pages they touch."""
        n = key.shape[2]
        self._ensure_capacity(first + n)
        if self.fp8:
            return self._append_dense_fp8(key, value, first, kv_start)
        t = self._tensors
        if len(self.dense_heads) == key.shape[1]:
            t["dense_key"][:, :, first : first + n] = key
            t["dense_value"][:, :, first : first + n] = value
        else:
            for head, end, at in head_runs(self.dense_heads):
                t["dense_key"][:, at : at + end - head, first : first + n] = key[:, head:end]
                t["dense_value"][:, at : at + end - head, first : first + n] = value[:, head:end]
        self._refresh_page_statistics(first, first + n, kv_start)
        return t["dense_key"][:, :, : first + n], t["dense_value"][:, :, : first + n]

    @torch.no_grad()  # statistics for selection, never differentiated (and out= refuses tensors that need grad)
    def _refresh_page_statistics(self, first: int, end: int, kv_start: torch.Tensor, source=None, base: int = 0):
        """Key min/max of the logical pages overlapping slots [first, end), from the stored keys (or from
        ``source``, the keys of slots ``base ..`` through whole pages: FP8 pages' unquantized keys): real tokens
        below ``end`` only. Reshaped views, no index tensors; a temporary only where a chunk of pages holds
        padding or unwritten slots."""
        t = self._tensors
        keys, lp = t["dense_key"] if source is None else source, self.logical_page_size
        batch, heads, _, dim = keys.shape
        first_page, end_page = first // lp, -(-end // lp)
        for c0 in range(first_page, end_page, _STAT_CHUNK_PAGES):
            c1 = min(c0 + _STAT_CHUNK_PAGES, end_page)
            lo, hi = c0 * lp, c1 * lp
            region = keys[:, :, lo - base : hi - base]
            if region.shape[2] < hi - lo:  # a source that ends inside its last logical page: the rest is masked
                region = torch.nn.functional.pad(region, (0, 0, 0, hi - lo - region.shape[2]))
            low = high = region
            if hi > end or lo < self.sequence.max_kv_start:  # unwritten slots or (some row's) padding inside
                slots = torch.arange(lo, hi, device=keys.device)
                invalid = ((slots >= end)[None, :] | (slots[None, :] < kv_start[:, None]))[:, None, :, None]
                low = region.masked_fill(invalid, float("inf"))
                high = region.masked_fill(invalid, float("-inf"))
            shape = (batch, heads, c1 - c0, lp, dim)
            torch.amin(low.reshape(shape), dim=3, out=t["key_min"][:, :, c0:c1])  # written in place
            torch.amax(high.reshape(shape), dim=3, out=t["key_max"][:, :, c0:c1])

    def _resize_ring(self, size: int) -> None:
        """Give the ring ``size`` slots, keeping the newest tokens that fit (slot p at index p % size)."""
        t = self._tensors
        if t["ring_key"].shape[2] == size:
            return
        # new index j holds the one slot p of the newest ``size`` with p % size == j; it was at p % old_size, and
        # is kept if that old index still holds it (a gather: no host sync, once per layer in every prefill)
        old_pos = t["ring_pos"]
        oldest = self.seen - size
        slot = oldest + torch.remainder(torch.arange(size, device=old_pos.device) - oldest, size)
        source = torch.remainder(slot, old_pos.shape[0])
        kept = (slot >= 0) & (old_pos[source] == slot)
        for name in ("ring_key", "ring_value"):
            old = t[name]
            t[name] = torch.where(kept[None, None, :, None], old.index_select(2, source), 0)
        t["ring_pos"] = torch.where(kept, slot, -1)

    def _append_streaming(self, key, value, first: int, kv_start):
        """Store the streaming heads of ``key``/``value`` [B, Hkv, n, D] in sink and ring; return what they
        attend to (key, value, slots, all-heads flag, first query's index)."""
        t = self._tensors
        n = key.shape[2]
        ring_size = t["ring_key"].shape[2]
        idx = self.stream_idx
        if first == 0:  # nothing cached yet: the new tokens alone, read in place
            view = key, value, None, True, None
        elif first >= ring_size and first - ring_size >= self.sequence.max_kv_start + self.sink_size:
            # the ring holds slots first-R..first-1, all past every row's sinks: sinks, then the ring in slot
            # order, then the chunk are consecutive slots (a later prompt chunk of a long prompt)
            oldest = first % ring_size
            view = (
                torch.cat([t["sink_key"], t["ring_key"][:, :, oldest:], t["ring_key"][:, :, :oldest],
                           key.index_select(1, idx)], dim=2),
                torch.cat([t["sink_value"], t["ring_value"][:, :, oldest:], t["ring_value"][:, :, :oldest],
                           value.index_select(1, idx)], dim=2),
                None,
                False,
                self.sink_size + ring_size,
            )
        else:
            batch = key.shape[0]
            new_pos = torch.arange(first, first + n, device=key.device)[None, :].expand(batch, n)
            # ring tokens that are also sink tokens of their row are already in the sink buffer
            ring_pos = t["ring_pos"][None, :].expand(batch, -1)
            ring_pos = torch.where(ring_pos - kv_start[:, None] < self.sink_size, -1, ring_pos)
            view = (
                torch.cat([t["sink_key"], t["ring_key"], key.index_select(1, idx)], dim=2),
                torch.cat([t["sink_value"], t["ring_value"], value.index_select(1, idx)], dim=2),
                torch.cat([t["sink_pos"], ring_pos, new_pos], dim=1),
                False,
                None,
            )
        # sinks: the first sink_size real tokens of each row (only the chunk's first tokens can be any); sink
        # slot s of row b holds slot kv_start[b] + s, chunk index kv_start[b] + s - first (no host sync)
        limit = min(n, self.sequence.max_kv_start + self.sink_size - first)  # chunk tokens that can be sinks
        if self.sink_size and limit > 0:
            column = kv_start[:, None] + torch.arange(self.sink_size, device=key.device)[None, :] - first  # [B, S]
            here = (column >= 0) & (column < limit)
            index = column.clamp(0, limit - 1)[:, None, :, None].expand(-1, len(self.stream_heads), -1, key.shape[3])
            keep = here[:, None, :, None]
            heads_key = key[:, :, :limit].index_select(1, idx)
            heads_value = value[:, :, :limit].index_select(1, idx)
            t["sink_key"].copy_(torch.where(keep, heads_key.gather(2, index), t["sink_key"]))
            t["sink_value"].copy_(torch.where(keep, heads_value.gather(2, index), t["sink_value"]))
            t["sink_pos"].copy_(torch.where(here, column + first, t["sink_pos"]))
        # ring: the last ring_size tokens, slot p at index p % ring_size
        keep = min(n, ring_size)
        ring_slots = torch.arange(first + n - keep, first + n, device=key.device)
        index = ring_slots % ring_size
        t["ring_key"].index_copy_(2, index, key[:, :, n - keep :].index_select(1, idx))
        t["ring_value"].index_copy_(2, index, value[:, :, n - keep :].index_select(1, idx))
        t["ring_pos"].index_copy_(0, index, ring_slots)
        return view
