"""The Transformers ``Cache`` a patched model decodes with: one :class:`~sparse_attn_hf.cache.layer.SparseLayer` per
layer sharing one :class:`~sparse_attn_hf.cache.sequence.SequenceState`, and what a decode graph needs of it."""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache

from .layer import SparseLayer
from .sequence import SequenceState


class SparseCache(Cache):
    """The plugin's KV cache for a patched model (see the module docstring for the layout).

    Args:
        model: a model patched by ``patch_model``; the cache follows its head labels and settings.
        max_cache_len: tokens to allocate for dense heads up front (``generate()`` passes prompt +
            new tokens); the buffer doubles past it.

    Example (Transformers 5.24 and newer take ``cache=``, earlier releases ``past_key_values=``;
    ``sparse_attn_hf.compat.CACHE_ARG`` names the installed one):
        >>> cache = SparseCache(model)
        >>> out = model.generate(**inputs, cache=cache, max_new_tokens=32)
        >>> cache.nbytes(), cache.dynamic_cache_nbytes()

    A decoding loop of your own marks its steps with :meth:`decoding`::

        >>> cache = SparseCache(model)
        >>> logits = model(prompt_ids, cache=cache).logits                   # prefill
        >>> with cache.decoding():                                           # one-token steps decode
        ...     for _ in range(32):
        ...         token = logits[:, -1:].argmax(-1)
        ...         logits = model(token, cache=cache).logits
    """

    def __init__(self, model, max_cache_len: int | None = None):
        state = getattr(model, "_sparse_attn_state", None)
        if state is None:
            raise ValueError("SparseCache needs a patched model: call sparse_attn_hf.patch_model(model) first.")
        settings = state.settings
        self.sequence = SequenceState(state, max_cache_len)
        layers = []
        for layer in range(state.streaming.shape[0]):
            sink, local, decode_local = state.rule(layer)  # a native window layer: (0, window, window)
            layers.append(SparseLayer(
                self.sequence,
                layer,
                *state.head_lists(layer),
                sink_size=sink,
                local_size=local,
                page_size=settings.page_size,
                logical_page_size=settings.logical_page_size,
                token_budget=settings.token_budget,
                reuse_interval=settings.reuse_interval,
                decode_local_size=decode_local,
                shortlist=settings.shortlist,
                compiled_decode=settings.decode_compile,
                kv_dtype=settings.kv_dtype,
            ))
        super().__init__(layers=layers)

    @property
    def owner(self):
        return self.sequence.owner

    @contextlib.contextmanager
    def decoding(self, prompt_end: int | None = None):
        """Within this block, a one-token forward at slot ``prompt_end`` or later (default: the tokens seen
        so far) is a decode step: page selection for dense heads, the decode window for streaming heads.
        Outside it every forward is prefill. ``generate()`` on a patched model enters it by itself."""
        sequence = self.sequence
        previous = sequence.decode_from, sequence.decoding
        sequence.decode_from = self.get_seq_length() if prompt_end is None else prompt_end
        sequence.decoding = True
        for layer in self.layers:  # a prefill made before this block: size what compiled steps write now
            if layer.is_compileable and layer.is_initialized and layer.seen >= sequence.decode_from:
                layer.prepare_decode()
        try:
            yield self
        finally:
            sequence.decode_from, sequence.decoding = previous

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        seq = self.sequence
        if seq.kv_start is not None:
            seq.kv_start = seq.kv_start.index_select(0, beam_idx.to(seq.kv_start.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        seq = self.sequence
        if seq.kv_start is not None:
            seq.kv_start = seq.kv_start.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        seq = self.sequence
        if seq.kv_start is not None:
            seq.kv_start = seq.kv_start[indices.to(seq.kv_start.device)]

    def reset(self):
        super().reset()
        self.sequence.reset()

    def nbytes(self) -> int:
        """Bytes allocated by the cache (capacity, page statistics and slot tables included)."""
        return sum(layer.nbytes() for layer in self.layers)

    # ----------------------------------------------- what a decode graph needs (``decode_graph``)
    def buffer_addresses(self) -> tuple:
        """The address of every buffer a decode step reads or writes: a captured step replays only while none moved
        (beam search reorders them, growth reallocates them)."""
        return tuple(t.data_ptr() for layer in self.layers for t in layer._tensors.values())

    def lengths(self) -> list[int]:
        """Each layer's host-side count of stored tokens."""
        return [layer.seen for layer in self.layers]

    def advance(self) -> None:
        """Advance each layer's host-side count by the token a replayed step stored on the device (a replay runs
        no Python)."""
        for layer in self.layers:
            layer.seen += 1

    def set_lengths(self, lengths: list[int]) -> None:
        """Put back the counts of :meth:`lengths` (a capture that failed ran the Python, not the kernels)."""
        for layer, count in zip(self.layers, lengths):
            layer.seen = count

    def dynamic_cache_nbytes(self) -> int:
        """Bytes a ``DynamicCache`` would hold for the same tokens (all heads, all tokens, K and V)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                heads = len(layer.dense_heads) + len(layer.stream_heads)
                total += 2 * layer.batch * heads * layer.seen * layer.head_dim * layer.dtype.itemsize
        return total
