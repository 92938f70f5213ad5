"""The decode step's owner: :class:`DecodePlan`, one per SparseCache and device, read top to bottom.

0. **Reset** after a prefill (:meth:`DecodePlan.reset`): the counters restart from the tokens stored, so the next
   step selects anew.
1. **Plan** (:meth:`DecodePlan.plan`, once per step: the first layer on the device): the counters advance
   (``page_selection.plan_step``): one more token stored, and whether this step selects pages anew (every
   ``reuse_interval`` steps once the context outgrows the token budget, and after any prefill).
2. **Store** the new token of every KV head (the cache's ``append_decode``: the slot comes from the counters).
3. **Select** the dense heads' pages (``page_selection.select_pages``: a bound per page, a short list ranked by
   exact attention mass, a top-k of fixed width), where the settings select on this device and the context
   outgrows the budget; otherwise the dense heads read every stored token (exact).
4. **Attend**: dense heads to the chosen pages and the tail, streaming heads to sink + decode window
   (``ops.paged_decode``).

Every value that changes per step stays on the device and no shape depends on the step: ``decode_graph`` captures
the whole model's step once and replays it while :meth:`DecodePlan.why_not_replayable` finds nothing, decided by
the code that dispatches the ops. The cache stores (buffers, statistics, the counters, the selection kept between
steps, sized with its capacity and counted in its bytes); this module decides what a step does with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..config import UNLIMITED_BUDGET
from ..kernels.layout import LogitTerms, Visibility, reset_step
from .page_selection import PageSettings, plan_step, select_pages

_NO_SELECTION = ("no page selection: the dense heads read every stored token (exact); on a CPU it costs more than it "
                 "saves (SparseConfig(page_selection='always') selects there too)")


@dataclass
class DecodePlan:
    """The decode steps of one SparseCache on one device.

    ``step``: the counters (int32 [4], ``kernels.layout.STEP_*``), stored by the cache at a fixed address and
    written only here (and by the kernels this plan launches). ``planner``: the layer that plans each step (the
    first to run on the device). ``selects``: whether steps select pages (``SparseConfig.page_selection``: by
    default on CUDA only). ``pages``: the page-selection settings every layer of the cache shares.
    """

    step: torch.Tensor
    planner: int
    selects: bool
    pages: PageSettings
    reuse_interval: int

    @classmethod
    def of(cls, layer) -> "DecodePlan":
        """The plan of ``layer``'s cache on its device (made on the first call, by the first layer that runs)."""
        plans, key = layer.sequence.plans, str(layer.device)
        plan = plans.get(key)
        if plan is None:
            mode = layer.sequence.owner.settings.page_selection
            selects = mode == "always" or (mode == "auto" and layer.device.type == "cuda")
            pages = PageSettings(budget=layer.token_budget, page_size=layer.page_size,
                                 logical_page_size=layer.logical_page_size, shortlist=layer.shortlist)
            plan = plans[key] = cls(layer.step, layer.layer_idx, selects, pages, layer.reuse_interval)
        return plan

    # ------------------------------------------------------------------ the step
    def reset(self, layer) -> None:
        """New prompt tokens are stored in ``layer``: the next decode step selects anew. The planning layer resets
        the counters to the tokens stored, on the device (no host sync)."""
        if layer.layer_idx == self.planner:
            reset_step(self.step, layer.seen)

    def plan(self, layer) -> None:
        """Once per step (the planning layer): advance the counters and count the step in the call's record."""
        if layer.layer_idx != self.planner:
            return
        budget = self.pages.budget if self.selects else UNLIMITED_BUDGET
        plan_step(self.step, budget=budget, page_size=self.pages.page_size, reuse_interval=self.reuse_interval)
        # counted where Python runs the step: not inside Transformers' compiled step (torch.compile must not trace
        # the count) nor inside our graph's capture (decode_graph counts its replays)
        if not torch.compiler.is_compiling() and not (layer.device.type == "cuda"
                                                      and torch.cuda.is_current_stream_capturing()):
            record = layer.sequence.owner.record
            record.decode_steps += 1
            if not self.selects and layer.token_budget < layer.capacity:
                record.decode_note = _NO_SELECTION

    def run(self, layer, query: torch.Tensor, pending, visible: Visibility, terms: LogitTerms) -> torch.Tensor:
        """One decode step of ``layer`` -> [B, Hq, D]: plan, store the token, choose the dense heads' pages, attend.
        query [B, Hq, 1, D]; ``pending`` holds the new token's keys and values; ``visible`` the rows' kv_start (its
        sink and window are the layer's)."""
        self.plan(layer)
        kv = layer.append_decode(pending.key, pending.value, visible.kv_start)
        if layer.dense_heads and self.selects and self.pages.budget < layer.capacity:  # else every token: exact
            grouped = query.view(query.shape[0], len(layer.head_kind), -1, query.shape[-1])
            grouped = grouped.index_select(1, layer.dense_idx)
            kv.pages = select_pages(grouped, layer.selection_buffers(), self.step, visible, terms, self.pages)
            layer.keep_pages(kv.pages)
        visible = visible.but(sink=layer.sink_size, local=layer.decode_local_size)
        return ops.paged_decode(query[:, :, 0], kv, visible, terms)

    # ------------------------------------------------------------------ replaying it
    @staticmethod
    def why_not_replayable(layers, device: torch.device) -> str | None:
        """Why a captured decode step could not replay the next step of these cache layers (None: it can): a step
        that would run part of the PyTorch reference (it reads device values on the host; the same conditions that
        dispatch the ops, ``ops.decode_on_host``), or a cache that would have to grow (its buffers would move)."""
        first = layers[0]
        on_host = ops.decode_on_host(first.dtype, first.head_dim, device, first.page_size, first.logical_page_size)
        if on_host:
            return on_host
        if any(len(layer.dense_heads) and layer.seen + 1 > layer.capacity for layer in layers):
            return "the cache would have to grow (generate sizes it for prompt + max_new_tokens)"
        return None
