"""One decode step of one layer over a SparseCache, top to bottom.

0. After a prefill (``after_prefill``) the counters restart from the tokens stored: the next step selects anew.
1. **Plan** (the first layer that runs on a device, once per step): the step's counters on the device advance
   (``page_selection.plan_step``): one more token stored, and whether this step selects pages anew (every
   ``reuse_interval`` steps once the context outgrows the token budget, and after any prefill).
2. **Store** the new token of every KV head (the cache's ``append_decode``: the slot comes from the counters).
3. **Select** the dense heads' pages (``page_selection.select_pages``: a bound per page, a short list ranked by
   exact attention mass, a top-k of fixed width), where the settings select on this device and the context
   outgrows the budget; otherwise the dense heads read every stored token (exact).
4. **Attend**: dense heads to the chosen pages and the tail, streaming heads to sink + decode window
   (``ops.paged_decode``).

Every value that changes per step stays on the device, and no shape depends on the step: ``decode_graph`` captures
the whole model's step once and replays it. What the step reads lives in the cache (buffers, statistics, counters,
the selection kept between steps); this module decides what to do with it.
"""

from __future__ import annotations

import torch

from .. import ops
from ..config import UNLIMITED_BUDGET
from ..kernels.layout import reset_step
from .page_selection import plan_step, select_pages


def decode_step(layer, query: torch.Tensor, pending, kv_start: torch.Tensor, scale: float,
                terms: dict) -> torch.Tensor:
    """One decode step of one layer -> [B, Hq, D]: plan (the first layer on the device advances the step's
    counters), store the token, choose the dense heads' pages, attend. Every step-dependent value stays on
    the device (a CUDA graph can replay the step, ``decode_graph``)."""
    selects = _selects(layer)
    settings = dict(budget=layer.token_budget if selects else UNLIMITED_BUDGET, page_size=layer.page_size)
    if layer.plans_step:
        plan_step(layer.step, reuse_interval=layer.reuse_interval, **settings)
        # counted where Python runs the step: not inside Transformers' compiled step (torch.compile must not trace
        # the count) nor inside our graph's capture (decode_graph counts its replays)
        if not torch.compiler.is_compiling() and not (layer.device.type == "cuda"
                                                      and torch.cuda.is_current_stream_capturing()):
            record = layer.sequence.owner.record
            record.decode_steps += 1
            if not selects and layer.token_budget < layer.capacity:
                record.decode_note = _NO_SELECTION
    kv = layer.append_decode(pending.key, pending.value, kv_start, statistics=selects)
    if layer.dense_heads and selects and layer.token_budget < layer.capacity:  # else every token is read: exact
        buffers = layer.selection_buffers()
        grouped = query.view(query.shape[0], len(layer.head_kind), -1, query.shape[-1]).index_select(1, layer.dense_idx)
        kv.pages = select_pages(grouped, buffers["key_min"], buffers["key_max"], kv_start=kv_start, step=layer.step,
                                scores=buffers["scores"], logical_page_size=layer.logical_page_size,
                                selected=buffers["selected"], shortlist=layer.shortlist, listed=buffers["listed"],
                                keys=buffers["keys"], scale=scale,
                                softcap=terms.get("softcap"), pages=buffers["pages"], **settings)
        layer.keep_pages(kv.pages)
    return ops.paged_decode(query[:, :, 0], kv, kv_start=kv_start, sink=layer.sink_size,
                            local=layer.decode_local_size, scale=scale, **terms)


_NO_SELECTION = ("no page selection: the dense heads read every stored token (exact); on a CPU it costs more than it "
                 "saves (SparseConfig(page_selection='always') selects there too)")


def _selects(layer) -> bool:
    """Whether this layer's decode steps select pages (``SparseConfig.page_selection``): by default on CUDA only."""
    mode = layer.sequence.owner.settings.page_selection
    return mode == "always" or (mode == "auto" and layer.device.type == "cuda")


def after_prefill(layer) -> None:
    """New prompt tokens are stored: the next decode step selects anew. The first layer on a device (the one that
    plans its steps) resets the counters to the tokens stored, on the device (no host sync)."""
    if layer.plans_step:
        reset_step(layer.step, layer.seen)


def why_not_replayable(layers, device: torch.device) -> str | None:
    """Why a captured decode step could not replay the next step of these cache layers (None: it can): a step that
    would run part of the PyTorch reference (it reads device values on the host; the same conditions that
    dispatch the ops, ``ops.decode_on_host``), or a cache that would have to grow (its buffers would move)."""
    first = layers[0]
    on_host = ops.decode_on_host(first.dtype, first.head_dim, device, first.page_size, first.logical_page_size)
    if on_host:
        return on_host
    if any(len(layer.dense_heads) and layer.seen + 1 > layer.capacity for layer in layers):
        return "the cache would have to grow (generate sizes it for prompt + max_new_tokens)"
    return None
