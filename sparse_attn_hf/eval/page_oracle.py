"""Page selection against an oracle (evaluation only, slow).

Decoding reads, per dense KV head, the pages that ``methods/page_selection`` chooses: by default the bound's
short list of 4x re-ranked by exact mass ("quest_rerank4" here), with ``SparseConfig(shortlist=1)`` the pages
Quest's bound ranks first ("quest"). The oracle reads the pages of highest *true* attention mass at the same
budget, with the same always-kept pages (each row's first real page, and the newest page onwards). Both are judged by the attention-mass
recall of a decode step and KV head: the true attention mass of the group's query heads that falls on the
pages read, divided by its total (the group's query heads each hold mass 1).

    with page_oracle.recording("oracle", scale=head_dim ** -0.5) as recalls:
        model.generate(...)                      # decode steps read the oracle's pages
    sum(recalls) / len(recalls)                  # mean recall over steps, layers and KV heads
"""

from __future__ import annotations

import contextlib

import torch

from ..methods import page_selection


def page_mass(query: torch.Tensor, keys: torch.Tensor, *, kv_start: torch.Tensor, seen: int, page_size: int,
              scale: float) -> torch.Tensor:
    """True attention mass per physical page, float32 [B, Hd, ceil(seen / page_size)], summed over the
    group's query heads. query [B, Hd, G, D] at slot ``seen - 1``; keys [B, Hd, >= seen, D]; pads get none."""
    batch, heads = query.shape[:2]
    scores = torch.einsum("bhgd,bhnd->bhgn", query.float(), keys[:, :, :seen].float()) * scale
    real = torch.arange(seen, device=keys.device)[None, :] >= kv_start[:, None]
    probs = torch.softmax(scores.masked_fill(~real[:, None, None], float("-inf")), dim=-1).nan_to_num(0.0)
    n_pages = -(-seen // page_size)
    mass = torch.zeros(batch, heads, n_pages * page_size, device=keys.device)
    mass[:, :, :seen] = probs.sum(dim=2)
    return mass.view(batch, heads, n_pages, page_size).sum(-1)


def oracle_pages(mass: torch.Tensor, *, kv_start: torch.Tensor, budget: int, page_size: int):
    """The oracle's choice, in ``select_pages``' format: ``(pages int32 [B, Hd, budget/page - 1], tail_first)``;
    each row's first real page always, the newest page as the tail, the rest by the highest mass."""
    batch, heads, n_pages = mass.shape
    budget_pages = budget // page_size
    if n_pages <= budget_pages:
        return _nothing(mass)
    tail_first = n_pages - 1
    return _top_pages(mass[:, :, :tail_first], kv_start=kv_start, budget_pages=budget_pages,
                      page_size=page_size), tail_first


def _real_pages(tail_first: int, kv_start: torch.Tensor, page_size: int) -> torch.Tensor:
    """bool [B, pages]: the candidate pages that hold a real (non-pad) token."""
    return (torch.arange(tail_first, device=kv_start.device)[None, :] + 1) * page_size > kv_start[:, None]


def _top_pages(scores: torch.Tensor, *, kv_start: torch.Tensor, budget_pages: int, page_size: int) -> torch.Tensor:
    """The ``budget_pages - 1`` best candidate pages by ``scores`` [B, Hd, pages] (higher first), as
    ``select_pages`` chooses them: pages of padding never, each row's first real page always; int32, -1 where a
    row has fewer candidates."""
    batch, heads, tail_first = scores.shape
    scores = torch.where(_real_pages(tail_first, kv_start, page_size)[:, None], scores, float("-inf"))
    first_real = (kv_start // page_size).clamp(max=tail_first - 1)
    scores.scatter_(2, first_real.view(batch, 1, 1).expand(batch, heads, 1), float("inf"))
    values, chosen = torch.topk(scores, budget_pages - 1, dim=-1, sorted=False)
    return torch.where(values == float("-inf"), -1, chosen).to(torch.int32)


def mass_recall(mass: torch.Tensor, pages: torch.Tensor, tail_first: int) -> torch.Tensor:
    """Share of the true attention mass on the pages read, float32 [B, Hd] (1 where everything is read)."""
    batch, heads, n_pages = mass.shape
    if pages.numel() == 0 and tail_first == 0:
        return torch.ones(batch, heads, device=mass.device)
    read = torch.zeros(batch, heads, n_pages + 1, dtype=torch.bool, device=mass.device)
    read.scatter_(2, torch.where(pages < 0, n_pages, pages.long()), True)
    read[:, :, tail_first:n_pages] = True
    return (mass * read[:, :, :n_pages]).sum(-1) / mass.sum(-1).clamp(min=1e-30)


def _page_bounds(query, key_min, key_max, *, seen: int, budget: int, page_size: int, logical_page_size: int,
                 logical: bool = False):
    """Quest's bound per query head and candidate page, float32 [B, Hd, G, pages] (a page scores the max of its
    logical pages; with ``logical``, [B, Hd, G, pages, logical pages per page] unreduced), and the tail's first
    page; None and 0 when the context fits the budget."""
    from ..kernels.reference import page_scores

    n_pages = -(-seen // page_size)
    if n_pages <= budget // page_size:
        return None, 0
    tail_first = n_pages - 1
    per_page = page_size // logical_page_size
    n_logical = tail_first * per_page
    scores = page_scores(query, key_min[:, :, :n_logical], key_max[:, :, :n_logical])
    scores = scores.view(*query.shape[:3], tail_first, per_page)
    return (scores if logical else scores.amax(-1)), tail_first


def _nothing(query):
    return torch.empty(*query.shape[:2], 0, dtype=torch.int32, device=query.device), 0


def per_head_pages(query, key_min, key_max, *, kv_start, seen: int, budget: int, page_size: int,
                   logical_page_size: int):
    """An estimator variant: Quest's bound ranked per query head, the group's budget shared round-robin (a
    page enters at the best rank any query head gives it), not by the group's maximum. ``select_pages``'
    format."""
    scores, tail_first = _page_bounds(query, key_min, key_max, seen=seen, budget=budget, page_size=page_size,
                                      logical_page_size=logical_page_size)
    if scores is None:
        return _nothing(query)
    scores = torch.where(_real_pages(tail_first, kv_start, page_size)[:, None, None], scores, float("-inf"))
    rank = torch.empty_like(scores)
    rank.scatter_(-1, scores.argsort(-1, descending=True), torch.arange(tail_first, device=query.device,
                                                                         dtype=scores.dtype).expand_as(scores))
    best = rank.amin(dim=2)  # [B, Hd, pages]: the round in which the page enters the union
    order = -best - 1e-6 * torch.arange(tail_first, device=query.device)  # ties: earlier page first
    return _top_pages(order, kv_start=kv_start, budget_pages=budget // page_size, page_size=page_size), tail_first


RECENT_SHARE = 0.25  # quest_recent: the share of the selected pages given to the newest ones


def recent_pages(query, key_min, key_max, *, kv_start, seen: int, budget: int, page_size: int,
                 logical_page_size: int, recent_share: float = RECENT_SHARE):
    """An estimator variant: a budget split that favours the recent pages. ``recent_share`` of the selected
    pages (at least one) are the newest pages before the tail, the rest Quest's bound chooses (the group's
    maximum, as ``select_pages``). ``select_pages``' format."""
    scores, tail_first = _page_bounds(query, key_min, key_max, seen=seen, budget=budget, page_size=page_size,
                                      logical_page_size=logical_page_size)
    if scores is None:
        return _nothing(query)
    scores = scores.amax(2)  # [B, Hd, pages]
    budget_pages = budget // page_size
    n_recent = max(1, round(recent_share * (budget_pages - 1)))
    scores[:, :, max(0, tail_first - n_recent):] = float("inf")
    return _top_pages(scores, kv_start=kv_start, budget_pages=budget_pages, page_size=page_size), tail_first


def mass_estimate_pages(query, key_min, key_max, *, kv_start, seen: int, budget: int, page_size: int,
                        logical_page_size: int, scale: float, radius: float = 1.0):
    """An estimator variant that aggregates as the oracle does: each query head turns its bounds into an
    estimated attention mass (a softmax of ``scale`` x bound over the logical pages of real tokens), a physical
    page sums the mass of its logical pages, and the group's query heads add their masses (Quest takes the
    group's maximum of raw bounds, where one head with large logits outranks the others). With ``radius`` < 1
    the bound shrinks towards the page's midpoint: ``q . mid + radius * |q| . (kmax - kmin) / 2``."""
    bounds, tail_first = _page_bounds(query, key_min, key_max, seen=seen, budget=budget, page_size=page_size,
                                      logical_page_size=logical_page_size, logical=True)
    if bounds is None:
        return _nothing(query)
    if radius != 1.0:
        from ..kernels.reference import page_scores

        n_logical = bounds.shape[3] * bounds.shape[4]
        mid = (key_min[:, :, :n_logical].float() + key_max[:, :, :n_logical].float()) / 2
        center = page_scores(query, mid, mid).view(bounds.shape)  # q . mid (min = max = mid)
        bounds = center + radius * (bounds - center)
    real = _real_pages(tail_first, kv_start, page_size)[:, None, None, :, None]
    logits = torch.where(real, bounds * scale, float("-inf")).flatten(3)
    mass = torch.softmax(logits, dim=-1).view(bounds.shape).sum(-1).sum(2)  # [B, Hd, pages]
    return _top_pages(mass, kv_start=kv_start, budget_pages=budget // page_size, page_size=page_size), tail_first


RERANK_FACTOR = 2  # quest_rerank: candidates per selected page


def rerank_pages(query, keys, key_min, key_max, *, kv_start, seen: int, budget: int, page_size: int,
                 logical_page_size: int, scale: float, factor: int = RERANK_FACTOR):
    """The package's two-stage choice (``SparseConfig.shortlist``, ``methods.page_selection``): Quest's bound
    short-lists ``factor`` x the selected pages, then the short list's keys rank them by exact attention mass. It
    reads ``factor`` x the selected keys on a selecting step, where an exact choice would read every key.
    ``select_pages``' format."""
    return page_selection.quest_pages(query, key_min, key_max, kv_start=kv_start, seen=seen, budget=budget,
                                      page_size=page_size, logical_page_size=logical_page_size, shortlist=factor,
                                      keys=keys, scale=scale)


KINDS = ("quest", "oracle", "quest_per_head", "quest_recent", "quest_mass", "quest_mass_mid", "quest_rerank",
         "quest_rerank4")


@contextlib.contextmanager
def recording(kind: str, *, scale: float):
    """Decode steps choose pages by ``kind`` ("quest": Quest's bound alone; "oracle"; "quest_per_head": the
    bound ranked per query head, see ``per_head_pages``; "quest_recent": see ``recent_pages``; "quest_mass" and
    "quest_mass_mid": see ``mass_estimate_pages``; "quest_rerank" and "quest_rerank4": see ``rerank_pages``,
    short lists of 2x and 4x, the latter the package's default), and the mass recall of every (step, layer,
    batch row, KV head) is appended to the yielded list."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    recalls: list[float] = []

    def choose(query, keys, key_min, key_max, *, quest, kv_start, seen, budget, page_size, logical_page_size):
        mass = page_mass(query, keys, kv_start=kv_start, seen=seen, page_size=page_size, scale=scale)
        if kind == "oracle":
            pages, tail_first = oracle_pages(mass, kv_start=kv_start, budget=budget, page_size=page_size)
        elif kind == "quest_recent":
            pages, tail_first = recent_pages(query, key_min, key_max, kv_start=kv_start, seen=seen, budget=budget,
                                             page_size=page_size, logical_page_size=logical_page_size)
        elif kind in ("quest_mass", "quest_mass_mid"):
            pages, tail_first = mass_estimate_pages(query, key_min, key_max, kv_start=kv_start, seen=seen,
                                                    budget=budget, page_size=page_size,
                                                    logical_page_size=logical_page_size, scale=scale,
                                                    radius=0.5 if kind == "quest_mass_mid" else 1.0)
        elif kind in ("quest_rerank", "quest_rerank4"):
            pages, tail_first = rerank_pages(query, keys, key_min, key_max, kv_start=kv_start, seen=seen, budget=budget,
                                             page_size=page_size, logical_page_size=logical_page_size, scale=scale,
                                             factor=4 if kind == "quest_rerank4" else RERANK_FACTOR)
        elif kind == "quest_per_head":
            pages, tail_first = per_head_pages(query, key_min, key_max, kv_start=kv_start, seen=seen, budget=budget,
                                               page_size=page_size, logical_page_size=logical_page_size)
        else:
            pages, tail_first = quest(query, key_min, key_max, kv_start=kv_start, seen=seen, budget=budget,
                                      page_size=page_size, logical_page_size=logical_page_size)
        recalls.extend(mass_recall(mass, pages, tail_first).flatten().tolist())
        return pages, tail_first

    with page_selection.selector(choose):
        yield recalls
