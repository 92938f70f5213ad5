"""Query-aware page selection for decoding (LServe's dynamic sparsity, after Quest).

For each 16-token logical page the cache keeps the element-wise min and max of its keys. The score of
a page for a query ``q`` bounds ``q . k`` from above for every key ``k`` of the page::

    S = sum_d max(q_d * kmax_d, q_d * kmin_d) = relu(q) . kmax - relu(-q) . kmin

(the right-hand form is two matrix products, no [pages, D] temporary). A physical page (64 tokens)
scores the max of its logical pages; a KV head scores a page by the max over its group's query heads,
so that one selection (one gather) serves the whole group. The first real page (the attention
sink) is always kept; the newest page and everything after it (the *tail*) is always attended; the
remaining budget goes to the highest-scoring pages.
"""

from __future__ import annotations

import contextlib

import torch

from .. import ops

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


def select_pages(
    query: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    *,
    kv_start: torch.Tensor,
    seen: int,
    budget: int,
    page_size: int,
    logical_page_size: int,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Choose the pages a decode step of the dense heads reads.

    Args:
        query: [B, Hd, G, D], the dense KV heads' query heads (G per KV head).
        key_min, key_max: [B, Hd, >= ceil(seen / logical_page_size), D] logical-page statistics
            (+inf / -inf where a page holds no real key).
        kv_start: [B] first real slot of each row; seen: tokens in the cache (the query is slot seen-1).
        budget: tokens to attend per head (a multiple of ``page_size``, at least two pages).
        keys: [B, Hd, >= seen, D] the stored keys; read only by an evaluation ``selector`` hook.

    Returns:
        (pages, tail_first): int32 [B, Hd, budget / page_size - 1] physical page ids (-1 where a row
        has fewer candidates), and the first page of the tail. When the context fits the budget:
        an empty list and 0 (attend to everything).
    """
    common = dict(kv_start=kv_start, seen=seen, budget=budget, page_size=page_size,
                  logical_page_size=logical_page_size)
    if _selector is not None:
        return _selector(query, keys, key_min, key_max, quest=_quest, **common)
    return _quest(query, key_min, key_max, **common)


def _quest(query, key_min, key_max, *, kv_start, seen: int, budget: int, page_size: int,
           logical_page_size: int) -> tuple[torch.Tensor, int]:
    n_pages = -(-seen // page_size)
    budget_pages = budget // page_size
    batch, heads = query.shape[:2]
    if n_pages <= budget_pages:
        return torch.empty(batch, heads, 0, dtype=torch.int32, device=query.device), 0
    tail_first = n_pages - 1
    scores = ops.physical_page_scores(query, key_min, key_max, kv_start=kv_start, num_pages=tail_first,
                                      page_size=page_size, logical_page_size=logical_page_size)
    values, pages = torch.topk(scores, budget_pages - 1, dim=-1, sorted=False)
    pages = torch.where(values == float("-inf"), -1, pages)
    return pages.to(torch.int32), tail_first
