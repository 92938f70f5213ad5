"""Query-aware page selection for decoding (LServe's dynamic sparsity, after Quest).

For each 16-token logical page the cache keeps the element-wise min and max of its keys. The score of
a page for a query ``q`` bounds ``q . k`` from above for every key ``k`` of the page::

    S = sum_d max(q_d * kmax_d, q_d * kmin_d) = relu(q) . kmax - relu(-q) . kmin

(the right-hand form is two matrix products, no [pages, D] temporary). A physical page (64 tokens)
scores the max of its logical pages; a KV head scores a page by the max over its group's query heads,
so that one selection (one gather) serves the whole group. The first real page (the attention
sink) is always kept; the newest page and everything after it (the *tail*) is always attended; the
remaining budget goes to the highest-scoring pages.

**Two stages** (``shortlist`` > 1, the default 4): the bound ranks pages only roughly (a page of keys that each
match the query on a few dimensions scores as high as one key that matches on all of them), so it short-lists
``shortlist`` x the pages to select, and the keys of the short list are read to rank those pages by their exact
attention mass (a softmax per query head over the short list's keys, summed over the group).
On held-out text at a budget of 1/4 of the context it keeps most of the answers the bound alone loses
(``benchmarks/results/heldout_fidelity.json``, ``page_selection_quest_rerank4.json``). It reads ``shortlist`` x
the budget's keys once per selection (every ``reuse_interval`` steps). Every launch of a selection returns at once
on a step that reuses the last one, which stays in the cache's ``selected`` buffer.

**Plan and run.** A decode step is planned once for all layers (:func:`plan_step`: the device counters
advance and decide whether this step selects anew, every ``reuse_interval`` steps and after any prefill)
and each layer runs :func:`select_pages` (``decode_step.DecodePlan`` sequences both): scores (only on a
reselecting step; otherwise the layer's stored
scores stand) and a top-k of fixed width. Nothing waits for the host and no shape depends on the step, so
a CUDA graph can replay the whole step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import ops
from ..kernels.fp8 import stored_tokens
from ..kernels.layout import STEP_DUE, STEP_RESELECT, STEP_SEEN, STEP_TAIL, LogitTerms, Visibility

_selector = None  # an evaluation hook replacing the bound-based choice (see ``selector``)


@contextlib.contextmanager
def selector(choose):
    """Within this block, decode steps choose their pages with ``choose(query, keys, key_min, key_max,
    quest=..., **same keyword arguments as select_pages)``, which returns ``(pages, tail_first)`` as
    ``select_pages`` does; ``quest`` is the bound-based choice, for a hook that only observes. For
    evaluation (``sparse_attn_hf.eval.page_oracle``): an oracle, or a recorder of attention-mass recall."""
    global _selector
    previous, _selector = _selector, choose
    try:
        yield
    finally:
        _selector = previous


def plan_step(step: torch.Tensor, *, budget: int, page_size: int, reuse_interval: int) -> None:
    """Once per decode step, for every layer on ``step``'s device: one more token is stored, and the step
    selects anew when the context no longer fits the budget and ``reuse_interval`` steps have used the last
    selection (or none was made since the last prefill); the tail starts at the newest page of the last
    selection. ``step`` int32 [4] (``kernels.layout.STEP_*``), updated in place: device work only."""
    step[STEP_SEEN : STEP_SEEN + 1].add_(1)
    seen, due, tail = step[STEP_SEEN], step[STEP_DUE], step[STEP_TAIL]
    n_pages = (seen + (page_size - 1)) // page_size
    fits = n_pages <= min(budget // page_size, 2**31 - 1)  # int32 counters (config.UNLIMITED_BUDGET is larger)
    reselect = (due <= 0) & ~fits
    zero = torch.zeros((), dtype=step.dtype, device=step.device)
    new_due = torch.where(reselect, zero + (reuse_interval - 1), torch.where(fits, zero, due - 1))
    new_tail = torch.where(fits, zero, torch.where(reselect, n_pages - 1, tail))
    step[STEP_DUE:].copy_(torch.stack([new_due, reselect.to(step.dtype), new_tail]))


@dataclass(frozen=True)
class PageSettings:
    """Page selection's settings (``SparseConfig``): tokens a dense head attends per step (``budget``, a multiple
    of ``page_size`` of at least two pages), the physical and logical page sizes, and the pages short-listed by the
    bound per page selected (1: the bound alone)."""

    budget: int
    page_size: int
    logical_page_size: int
    shortlist: int = 1


def select_pages(query: torch.Tensor, store: dict, step: torch.Tensor, visible: Visibility, terms: LogitTerms,
                 settings: PageSettings) -> torch.Tensor:
    """Choose the pages a decode step of the dense heads reads besides its tail.

    Args:
        query: [B, Hd, G, D], the dense KV heads' query heads (G per KV head).
        store: views of the layer's storage (``SparseLayer.selection_buffers``): ``key_min``/``key_max`` [B, Hd,
            >= width x page_size / logical_page_size, D] logical-page statistics (+inf / -inf where a page holds no
            real key); ``scores`` float32 [B, Hd, width], the bound's page scores (written on a reselecting step;
            width: the pages the buffers hold); ``selected`` int32 [B, Hd, budget / page_size - 1], the selection
            kept between steps (rewritten only on a reselecting step; None: a new one, for tests); ``listed``, the
            short list of a two-stage selection (int32 [B, Hd, shortlist x (budget / page_size - 1)], or None for a
            new one), ranked by exact attention mass, which reads ``keys`` (the stored keys [B, Hd, >= seen, D])
            with ``terms``' scale and soft-capping; ``pages``, the last selection, read only by an evaluation
            ``selector`` hook.
        step: the step's counters (int32 [4] on the device; :func:`plan_step` ran for this step).
        visible: ``kv_start`` [B], the first real slot of each row.

    Returns:
        ``selected``: physical page ids, -1 where a row has fewer candidates. While the context fits the budget
        the step attends to everything and does not read them.
    """
    width = settings.budget // settings.page_size - 1
    key_min, key_max, keys = store["key_min"], store["key_max"], store.get("keys")
    if _selector is not None:  # evaluation, on the host: the hook chooses on reselecting steps
        if store.get("pages") is not None and not int(step[STEP_RESELECT]):
            return store["pages"]
        if store.get("key_scale") is not None:  # FP8 pages: the hook reads the keys back
            keys = stored_tokens(keys, store["key_scale"], store["recent_key"], int(step[STEP_SEEN]), settings.page_size,
                                 query.dtype)
        chosen, _ = _selector(query, keys, key_min, key_max, quest=quest_pages, kv_start=visible.kv_start,
                              seen=int(step[STEP_SEEN]), budget=settings.budget, page_size=settings.page_size,
                              logical_page_size=settings.logical_page_size)
        return _to_width(chosen, width)
    return _choose(query, store, step, visible.kv_start, terms, settings)


def _choose(query, store: dict, step, kv_start, terms: LogitTerms, settings: PageSettings) -> torch.Tensor:
    """``select_pages`` without the evaluation hook: budget / page_size - 1 pages per row into ``selected``."""
    width = settings.budget // settings.page_size - 1
    selected = store.get("selected")
    if selected is None:
        selected = torch.full((*query.shape[:2], width), -1, dtype=torch.int32, device=query.device)
    seen, reselect = step[STEP_SEEN : STEP_SEEN + 1], step[STEP_RESELECT : STEP_RESELECT + 1]
    common = dict(kv_start=kv_start, seen=seen, reselect=reselect, page_size=settings.page_size)
    scores = store["scores"]
    ops.physical_page_scores(query, store["key_min"], store["key_max"], out=scores,
                             logical_page_size=settings.logical_page_size, **common)
    if settings.shortlist == 1:
        return ops.top_pages(scores, out=selected, reselect=reselect)
    listed = store.get("listed")
    if listed is None:
        listed = torch.full((*query.shape[:2], settings.shortlist * width), -1, dtype=torch.int32, device=query.device)
    ops.top_pages(scores, out=listed, reselect=reselect)
    return ops.shortlist_pages(query, store["keys"], scores, listed, out=selected, scale=terms.scale,
                               softcap=terms.softcap, key_scale=store.get("key_scale"), recent=store.get("recent_key"),
                               **common)


def _to_width(pages: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a page list [B, Hd, n <= width] with -1 to ``width`` columns."""
    if pages.shape[2] == width:
        return pages
    pad = torch.full((*pages.shape[:2], width - pages.shape[2]), -1, dtype=torch.int32, device=pages.device)
    return torch.cat([pages.to(torch.int32), pad], dim=2)


def quest_pages(query, key_min, key_max, *, kv_start, seen: int, budget: int, page_size: int,
                logical_page_size: int, shortlist: int = 1, keys: torch.Tensor | None = None,
                scale: float | None = None, softcap: float | None = None) -> tuple[torch.Tensor, int]:
    """The package's choice with host-side arguments (for evaluation hooks): Quest's bound alone by default, or
    two stages with ``shortlist`` > 1 (see :func:`select_pages`). Returns (pages [B, Hd, budget / page_size -
    1], tail_first), or an empty list and 0 when the context fits the budget."""
    n_pages = -(-seen // page_size)
    budget_pages = budget // page_size
    batch, heads = query.shape[:2]
    if n_pages <= budget_pages:
        return torch.empty(batch, heads, 0, dtype=torch.int32, device=query.device), 0
    scores = torch.empty(batch, heads, n_pages - 1, dtype=torch.float32, device=query.device)
    step = torch.zeros(4, dtype=torch.int32, device=query.device)
    step[STEP_SEEN], step[STEP_RESELECT] = seen, 1  # a reselecting step
    if shortlist > 1 and scale is None:
        raise ValueError("quest_pages with shortlist > 1 ranks pages by attention mass: pass the layer's scale.")
    store = dict(key_min=key_min, key_max=key_max, keys=keys, scores=scores)
    settings = PageSettings(budget, page_size, logical_page_size, shortlist)
    pages = _choose(query, store, step, kv_start, LogitTerms(1.0 if scale is None else scale, softcap), settings)
    return pages, n_pages - 1
