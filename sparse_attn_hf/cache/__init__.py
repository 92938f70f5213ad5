"""SparseCache: a Transformers ``Cache`` that stores each KV head the way its label needs.

Per layer:

* **dense KV heads** keep every token in pages of ``page_size`` tokens (64), each split into logical
  pages of ``logical_page_size`` (16). Pages of one batch row and head are consecutive in one
  preallocated buffer ``[B, H_dense, capacity, D]`` (``capacity`` a multiple of the page size), so a
  page is a view and never moves while the cache grows in place. ``generate()`` sizes the buffer for
  prompt + new tokens up front; past the capacity it doubles (one copy, amortized O(1) per token,
  never the per-token ``torch.cat`` of ``DynamicCache``). For every logical page the cache keeps the
  element-wise min and max of its real (non-pad) keys, ``[B, H_dense, capacity / 16, D]``, computed from
  the stored keys as tokens arrive (+inf / -inf where a page has no real key yet).
* **streaming KV heads** keep the first ``sink_size`` real tokens of each row and the last
  ``local_size`` tokens in a ring buffer of constant size; absolute slots are tracked. A hybrid model's
  native window layer is all streaming heads with no sink and its window as ``local_size`` (no decode
  shrink): a ring of the window's size, as Transformers' own sliding cache.

Transformers calls ``update()`` before the attention function, without the padding mask. So
``update()`` returns a :class:`PendingKV` in place of the key tensor; the plugin's attention function,
which knows the padding, calls :meth:`SparseLayer.append` (prefill) or :meth:`SparseLayer.append_decode`
(a decode step) and attends to what it returns. A SparseCache therefore only works with a model patched
by ``patch_model``.

**Prefill or decode.** A forward is a *decode step* (page selection for dense heads, the decode window
for streaming heads) only inside :meth:`SparseCache.decoding`, which ``generate()`` on a patched model
enters for its decoding loop, and only for one-token forwards past the prompt. Every other forward
(a one-token prompt chunk, a one-token ``model()`` call) is prefill: the static rule, exactly as one-shot.

The cache only stores; the attention function decides. Its objects form no reference cycle (layers share
a :class:`SequenceState`, which points at nothing), so its memory is freed as soon as it is dropped.

The package: ``views`` (what a prefill reads), ``sequence`` (what the layers share), ``layer`` (one layer's
storage), ``fp8_pages`` (its FP8 pages, ``SparseConfig(kv_dtype="fp8")``), ``sparse_cache`` (the Transformers adapter).
"""

from .layer import SparseLayer, head_runs
from .sequence import SequenceState
from .sparse_cache import SparseCache
from .views import LayerKV, PendingKV

__all__ = ["LayerKV", "PendingKV", "SequenceState", "SparseCache", "SparseLayer", "head_runs"]
