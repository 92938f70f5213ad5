"""Readable PyTorch references. Each Triton kernel of this package implements one of these contracts.

Positions are *slots*: the index of a token in the (left-padded) sequence of its batch row, counting
every token the model has seen, pads included. Row ``b``'s real tokens start at slot ``kv_start[b]``.

Key ``j`` is visible to query ``i`` of row ``b`` in KV head ``h`` when all of these hold::

    kv_start[b] <= k_pos[b, j] <= q_pos[b, i]                      (a real token, causal)
    not streaming[h]                                                (dense head)
        or k_pos[b, j] - kv_start[b] < sink                         (one of the first real tokens)
        or q_pos[b, i] - k_pos[b, j] < local                        (inside the local window)

Two optional terms of some families change the softmax, in every reference and kernel: **soft-capping**
(Gemma 2: a scaled score ``s`` becomes ``softcap * tanh(s / softcap)`` before masking) and **learned sinks**
(GPT-OSS: ``sinks[h]``, one extra logit per query head in the softmax's denominator, with no value; a query
that sees no key then gets zeros as before).

Causality is therefore aligned bottom-right for any Lq <= Lk when the positions are consecutive::

    keys     0 1 2 3 4 5 6 7          Lk = 8, Lq = 3: q_pos = [5, 6, 7]
    query 0  x x x x x x . .
    query 1  x x x x x x x .
    query 2  x x x x x x x x
"""

from __future__ import annotations

import torch

from .fp8 import quantize_pages, stored_tokens
from .layout import BlockTableSelection, DecodeKV, LogitTerms, Visibility


def visibility_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    kv_start: torch.Tensor,
    streaming: torch.Tensor,
    sink: int,
    local: int,
) -> torch.Tensor:
    """Bool [B, H, Lq, Lk]: which keys each query sees (see the module docstring).

    q_pos [B, Lq], k_pos [B, Lk] (int64; a negative key position marks an empty slot), kv_start [B],
    streaming [H] bool.
    """
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    start = kv_start[:, None, None, None]
    real_and_causal = (kp >= start) & (kp <= qp)
    in_window = ((kp - start) < sink) | ((qp - kp) < local)
    return real_and_causal & (in_window | ~streaming.view(1, -1, 1, 1))


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Scaled scores after soft-capping (``softcap * tanh(scores / softcap)``), or as they are."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of masked scores (-inf: not visible), with ``sinks`` (broadcastable to
    ``scores[..., :1]``) as one extra logit per row that takes probability but has no value. Rows that see
    nothing get zeros."""
    if sinks is None:
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)
    extra = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, extra], dim=-1), dim=-1)[..., :-1]


def _group_sinks(sinks: torch.Tensor | None, num_kv: int, extra_dims: int):
    """sinks [Hq] -> [1, Hkv, G, 1 x extra_dims] for scores laid out [B, Hkv, G, ...]."""
    return None if sinks is None else sinks.float().view(1, num_kv, -1, *([1] * extra_dims))


def sparse_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: Visibility,
                               terms: LogitTerms, *, tile: int = 256) -> torch.Tensor:
    """Attention of dense and streaming heads, tile by tile over queries.

    Args:
        query: [B, Hq, Lq, D]; query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA; K/V are
            never repeated in memory).
        key, value: [B, Hkv, Lk, D].
        visible: the visibility rule of this module (every KV head of ``key``; ``heads`` unused).
        terms: the softmax scale (usually D ** -0.5), soft-capping and learned sinks [Hq].
        tile: query rows per step; memory is O(B * Hq * tile * Lk). Each tile computes only the key
            columns that some query of the tile sees, so causal and window sparsity save work.

    Returns:
        [B, Lq, Hq, D] in the dtype of ``query``. Softmax runs in float32 (float64 for float64
        inputs). A query that sees no key (a pad) gets zeros.
    """
    if visible.heads is not None:
        raise ValueError("the reference attends every KV head of key: gather the heads first (ops.sparse_attention).")
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    kv_start, sink, local = visible.kv_start, visible.sink, visible.local
    scale, softcap, sinks = terms.scale, terms.softcap, terms.sinks
    streaming = visible.streaming_flags(num_kv_heads, query.device)
    q_pos = torch.arange(visible.q_first, visible.q_first + q_len, device=query.device).expand(batch, -1)
    k_pos = torch.arange(k_len, device=query.device).expand(batch, -1) if visible.k_pos is None else visible.k_pos
    groups = num_heads // num_kv_heads
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    k = key.to(compute)
    v = value.to(compute)
    q = query.view(batch, num_kv_heads, groups, q_len, head_dim)
    out = torch.empty(batch, q_len, num_heads, head_dim, dtype=query.dtype, device=query.device)
    for start in range(0, q_len, tile):
        stop = min(start + tile, q_len)
        q_tile = q[:, :, :, start:stop].to(compute)
        mask = visibility_mask(q_pos[:, start:stop], k_pos, kv_start, streaming, sink, local)
        k_tile, v_tile = k, v
        columns = torch.nonzero(mask.any(dim=(0, 1, 2))).flatten()
        if columns.numel() < k_len:  # skip keys no query of the tile sees (future, outside the window)
            k_tile, v_tile = k.index_select(2, columns), v.index_select(2, columns)
            mask = mask.index_select(3, columns)
        scores = capped(torch.einsum("bhgqd,bhkd->bhgqk", q_tile, k_tile) * scale, softcap)
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        if sinks is not None:
            probs = softmax_with_sinks(scores, _group_sinks(sinks, num_kv_heads, 2).to(compute))
        else:
            row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(compute).min)
            weights = torch.exp(scores - row_max)
            denom = weights.sum(dim=-1, keepdim=True)
            probs = weights / denom.clamp_min(torch.finfo(compute).tiny)
        tile_out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v_tile)
        out[:, start:stop] = tile_out.reshape(batch, num_heads, stop - start, head_dim).transpose(1, 2).to(query.dtype)
    return out


def block_sparse_attention_reference(query, key, value, *, mask, kv_start, scale) -> torch.Tensor:
    """Attention on the elements a :class:`~sparse_attn_hf.block_mask.BlockSparseMask` computes
    (one mask row list per KV head), with causality and left padding. Small shapes only: it builds
    the dense [Hkv, Lq, Lk] mask. Returns [B, Lq, Hq, D] like ``sparse_attention_reference``."""
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    allowed = mask.to_dense().to(query.device)  # [Hkv, Lq, Lk], causal included
    real = torch.arange(k_len, device=query.device)[None, :] >= kv_start[:, None]  # [B, Lk]
    visible = allowed[None] & real[:, None, None, :]
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.view(batch, num_kv_heads, groups, q_len, head_dim).to(compute)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q, key.to(compute)) * scale
    scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see nothing: zeros
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, value.to(compute))
    return out.reshape(batch, num_heads, q_len, head_dim).transpose(1, 2).to(query.dtype)


def dense_tokens(kv: DecodeKV, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense heads' keys and values of slots 0..seen-1 [B, Hd, seen, D]: views of the buffers, or FP8 pages read
    back (dequantized, then the ring's newest pages) as ``dtype`` (default float32)."""
    seen = kv.seen
    if kv.key_scale is None:
        return kv.dense_key[:, :, :seen], kv.dense_value[:, :, :seen]
    dtype = dtype or torch.float32
    return (stored_tokens(kv.dense_key, kv.key_scale, kv.recent_key, seen, kv.page_size, dtype),
            stored_tokens(kv.dense_value, kv.value_scale, kv.recent_value, seen, kv.page_size, dtype))


def decode_visible_tokens(kv: DecodeKV, kv_start: torch.Tensor, sink: int, local: int, dense: bool = True,
                          dtype: torch.dtype | None = None):
    """Per head kind: (keys, values, visible) with keys [B, H_kind, n, D] and visible bool [B, H_kind, n]
    for the query at slot ``seen - 1`` (``dense`` False: the streaming heads' only; FP8 pages read back as ``dtype``,
    see :func:`dense_tokens`)."""
    parts = {}
    if kv.dense_key is not None and dense:
        batch, n_dense = kv.dense_key.shape[:2]
        n_pages = -(-kv.seen // kv.page_size)
        chosen = torch.zeros(batch, n_dense, n_pages + 1, dtype=torch.bool, device=kv.dense_key.device)
        if kv.pages is not None and kv.pages.numel():
            index = torch.where(kv.pages < 0, n_pages, kv.pages.long())  # -1 lands in a spare column
            chosen.scatter_(2, index, True)
        chosen[:, :, kv.tail_first :] = True
        slots = torch.arange(kv.seen, device=chosen.device)
        visible = chosen[:, :, slots // kv.page_size] & (slots[None, :] >= kv_start[:, None])[:, None]
        parts["dense"] = (*dense_tokens(kv, dtype), visible)
    if kv.sink_key is not None:
        query_slot = kv.seen - 1
        start = kv_start[:, None]
        ring = kv.ring_pos[None, :]
        ring_ok = (ring >= start) & (ring - start >= sink) & (query_slot - ring < local)
        visible = torch.cat([kv.sink_pos >= 0, ring_ok.expand(kv.sink_pos.shape[0], -1)], dim=1)
        keys = torch.cat([kv.sink_key, kv.ring_key], dim=2)
        values = torch.cat([kv.sink_value, kv.ring_value], dim=2)
        parts["stream"] = (keys, values, visible[:, None].expand(-1, keys.shape[1], -1))
    return parts


def paged_decode_reference(query: torch.Tensor, kv: DecodeKV, visible: Visibility,
                           terms: LogitTerms) -> torch.Tensor:
    """One decode step of one layer: query [B, Hq, D] at slot ``seen - 1`` -> [B, Hq, D].

    Dense heads attend to their chosen pages (``DecodeKV``), streaming heads to sink + recent window
    (the rule of this module: ``visible``'s kv_start, sink and ``local`` the decode window). Softmax in float32;
    ``terms`` as in the module docstring."""
    kv_start, sink, local = visible.kv_start, visible.sink, visible.local
    scale, softcap, sinks = terms.scale, terms.softcap, terms.sinks
    batch, num_heads, head_dim = query.shape
    num_kv = kv.head_kind.shape[0]
    groups = num_heads // num_kv
    out = torch.zeros(batch, num_kv, groups, head_dim, dtype=torch.float32, device=query.device)
    q = query.view(batch, num_kv, groups, head_dim).float()
    for kind, (keys, values, visible) in decode_visible_tokens(kv, kv_start, sink, local).items():
        heads = torch.nonzero(kv.head_kind == (0 if kind == "dense" else 1)).flatten()
        slots = kv.head_slot[heads].long()
        scores = capped(torch.einsum("bhgd,bhnd->bhgn", q[:, heads], keys[:, slots].float()) * scale, softcap)
        scores = scores.masked_fill(~visible[:, slots, None], float("-inf"))
        group_sinks = _group_sinks(sinks, num_kv, 1)
        probs = softmax_with_sinks(scores, None if group_sinks is None else group_sinks[:, heads])
        out[:, heads] = torch.einsum("bhgn,bhnd->bhgd", probs, values[:, slots].float())
    return out.view(batch, num_heads, head_dim).to(query.dtype)


def page_scores(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """Logical page scores, float32 [B, H, G, n] for query [B, H, G, D] and key_min/key_max [B, H, n, D]:
    ``sum_d max(q_d kmax_d, q_d kmin_d) = relu(q) . kmax - relu(-q) . kmin``, an upper bound of q.k
    for every key of the page."""
    q = query.float()
    return torch.relu(q) @ key_max.float().transpose(-1, -2) - torch.relu(-q) @ key_min.float().transpose(-1, -2)


def physical_page_scores_reference(query, key_min, key_max, *, kv_start, seen: int, width: int, page_size: int,
                                   logical_page_size: int) -> torch.Tensor:
    """Scores of physical pages 0..width-1 for page selection, float32 [B, Hd, width].

    query [B, Hd, G, D]; key_min/key_max [B, Hd, >= width * page_size / logical_page_size, D]. The
    candidates are the pages before the tail (the newest page of ``seen`` tokens): ``ceil(seen / page_size)
    - 1`` of them; later pages score -inf. A candidate scores the max over its logical pages and over the G
    query heads; logical pages holding only padding score -inf; each row's first real page (the sink)
    scores +inf."""
    batch, heads = query.shape[:2]
    per_page = page_size // logical_page_size
    num_pages = min(-(-seen // page_size) - 1, width)
    out = torch.full((batch, heads, width), float("-inf"), dtype=torch.float32, device=query.device)
    if num_pages <= 0:
        return out
    n_logical = num_pages * per_page
    scores = page_scores(query, key_min[:, :, :n_logical], key_max[:, :, :n_logical]).amax(dim=2)
    logical = torch.arange(n_logical, device=query.device)
    has_real = (logical[None, :] + 1) * logical_page_size > kv_start[:, None]  # [B, n]: not all padding
    scores = torch.where(has_real[:, None], scores, float("-inf"))  # also clears NaN of empty pages
    scores = scores.view(batch, heads, num_pages, per_page).amax(dim=-1)
    first_real = (kv_start // page_size).clamp(max=num_pages - 1)
    out[:, :, :num_pages] = scores.scatter_(2, first_real.view(batch, 1, 1).expand(batch, heads, 1), float("inf"))
    return out


def top_pages_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` pages of highest score per row of ``scores`` [B, Hd, width]: int32 [B, Hd, k], in no particular
    order; pages scoring -inf are never chosen, and -1 fills the places of missing ones."""
    values, pages = torch.topk(scores, min(k, scores.shape[2]), dim=-1, sorted=False)
    pages = torch.where(values == float("-inf"), -1, pages).to(torch.int32)
    pad = torch.full((*scores.shape[:2], k - pages.shape[2]), -1, dtype=torch.int32, device=scores.device)
    return torch.cat([pages, pad], dim=2)


def shortlist_page_scores_reference(query, keys, bound, shortlist, *, kv_start, seen: int, page_size: int,
                                    scale: float, softcap: float | None = None, key_scale: torch.Tensor | None = None,
                                    recent: torch.Tensor | None = None) -> torch.Tensor:
    """Page selection's second stage: the short-listed pages scored by their exact attention mass, float32
    [B, Hd, width] (the shape of ``bound``).

    query [B, Hd, G, D]; keys [B, Hd, >= seen, D] (page ``p`` holds slots ``p * page_size ...``); bound [B, Hd,
    width], the first stage's scores (``physical_page_scores_reference``); shortlist int [B, Hd, n], the pages
    the bound ranks first (-1: none). Each query head takes a softmax over the real keys (slots ``kv_start ..
    seen - 1``) of the listed pages whose bound is not -inf; a page scores the mass that the group's query heads
    put on it. A page whose bound is +inf (the sink page) keeps +inf; a page off the list, or listed with a bound
    of -inf, scores -inf. FP8 pages: ``keys`` are e4m3 codes, ``key_scale`` [B, Hd, pages] their scales and
    ``recent`` the ring of the newest tokens (``kernels.fp8``); the keys are read back first."""
    if key_scale is not None:
        keys = stored_tokens(keys, key_scale, recent, seen, page_size)
    batch, heads, groups, dim = query.shape
    width = bound.shape[2]
    listed_max = max(int((shortlist >= 0).sum(-1).max()), 1)  # the places a row fills: the rest are -1
    shortlist = shortlist.sort(-1, descending=True).values[..., :listed_max]
    pages = shortlist.long().clamp(min=0)
    listed = torch.where(shortlist >= 0, bound.gather(2, pages), float("-inf"))  # [B, Hd, n]
    slots = pages[..., None] * page_size + torch.arange(page_size, device=query.device)  # [B, Hd, n, P]
    picked = keys.gather(2, slots.flatten(2)[..., None].clamp(max=keys.shape[2] - 1).expand(-1, -1, -1, dim))
    logits = capped(torch.einsum("bhgd,bhnd->bhgn", query.float(), picked.float()) * scale, softcap)
    real = (slots >= kv_start.view(batch, 1, 1, 1)) & (slots < seen) & (listed > float("-inf"))[..., None]
    probs = torch.softmax(logits.masked_fill(~real.flatten(2)[:, :, None], float("-inf")), dim=-1).nan_to_num(0.0)
    mass = probs.sum(2).view(*shortlist.shape, page_size).sum(-1)
    ranked = torch.where(listed == float("inf"), listed, torch.where(listed > float("-inf"), mass, float("-inf")))
    out = torch.full((batch, heads, width + 1), float("-inf"), dtype=torch.float32, device=query.device)
    return out.scatter_(2, torch.where(shortlist >= 0, pages, width), ranked)[:, :, :width]


def shortlist_pages_reference(query, keys, bound, shortlist, *, kv_start, seen: int, k: int, page_size: int,
                              scale: float, softcap: float | None = None, key_scale: torch.Tensor | None = None,
                              recent: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` listed pages of highest exact mass (``shortlist_page_scores_reference``), as
    ``top_pages_reference`` chooses them: int32 [B, Hd, k]."""
    scores = shortlist_page_scores_reference(query, keys, bound, shortlist, kv_start=kv_start, seen=seen,
                                             page_size=page_size, scale=scale, softcap=softcap, key_scale=key_scale,
                                             recent=recent)
    return top_pages_reference(scores, k)


def sampled_column_scores_reference(query, key, visible: Visibility, terms: LogitTerms, *, rows: torch.Tensor,
                                    window: torch.Tensor, tile: int = 64) -> torch.Tensor:
    """SampleAttention stage 1: the exact softmax attention of the sampled query rows over every visible
    key (real, causal), summed per key column over those rows and the GQA group's query heads, counting
    only entries *outside* the row's local window (the window is kept anyway).

    query [B, Hq, Lq, D] at slots ``visible.q_first + i``; key [B, Hkv, Lk, D]; rows int64 [n] (query indices);
    window int64 [B, Hkv]; ``visible.kv_start`` [B]. Returns float32 [B, Hkv, Lk]. Memory O(tile x Lk). With
    learned sinks a row's mass on its keys is what its sink leaves them."""
    q_first, kv_start = visible.q_first, visible.kv_start
    scale, softcap, sinks = terms.scale, terms.softcap, terms.sinks
    batch, num_heads, _, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv
    keys = key.float()
    k_pos = torch.arange(k_len, device=key.device)
    out = torch.zeros(batch, num_kv, k_len, dtype=torch.float32, device=key.device)
    for first in range(0, rows.numel(), tile):
        picked = rows[first : first + tile]
        q_pos = q_first + picked
        q = query[:, :, picked].float().view(batch, num_kv, groups, picked.numel(), head_dim)
        scores = capped(torch.einsum("bhgnd,bhkd->bhgnk", q, keys) * scale, softcap)
        real_causal = (k_pos[None, None, :] <= q_pos[None, :, None]) & (k_pos[None, None, :] >= kv_start[:, None, None])
        probs = softmax_with_sinks(scores.masked_fill(~real_causal[:, None, None], float("-inf")),
                                   _group_sinks(sinks, num_kv, 2))
        outside = (q_pos[None, None, :, None] - k_pos) >= window[:, :, None, None]  # [B, Hkv, n, Lk]
        out += (probs * outside[:, :, None]).sum(dim=(2, 3))
    return out


def stripe_attention_reference(query, key, value, mask, terms: LogitTerms, *, tile: int = 256) -> torch.Tensor:
    """Attention on a :class:`~sparse_attn_hf.stripe_mask.StripeMask` (window + stripes per row and KV
    head; causal, real tokens). query [B, Hq, Lq, D] (the last Lq slots of Lk), key/value [B, Hkv, Lk, D].
    Returns [B, Lq, Hq, D]; tile by tile over queries, softmax in float32."""
    scale, softcap, sinks = terms.scale, terms.softcap, terms.sinks
    batch, num_heads, q_len, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv
    k, v = key.float(), value.float()
    k_pos = torch.arange(k_len, device=key.device)
    columns = torch.stack([mask.columns(b) for b in range(batch)])  # [B, Hkv, Lk]
    q = query.view(batch, num_kv, groups, q_len, head_dim)
    out = torch.empty(batch, q_len, num_heads, head_dim, dtype=query.dtype, device=query.device)
    for start in range(0, q_len, tile):
        stop = min(start + tile, q_len)
        q_pos = torch.arange(k_len - q_len + start, k_len - q_len + stop, device=key.device)
        real_causal = (k_pos[None, None, :] <= q_pos[None, :, None]) & (k_pos >= mask.kv_start[:, None, None])
        in_window = (q_pos[None, None, :, None] - k_pos) < mask.window[:, :, None, None]  # [B, Hkv, t, Lk]
        visible = real_causal[:, None] & (in_window | columns[:, :, None, :])
        scores = capped(torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, start:stop].float(), k) * scale, softcap)
        probs = softmax_with_sinks(scores.masked_fill(~visible[:, :, None], float("-inf")),
                                   _group_sinks(sinks, num_kv, 2))
        tile_out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v)
        out[:, start:stop] = tile_out.reshape(batch, num_heads, stop - start, head_dim).transpose(1, 2).to(query.dtype)
    return out


def append_token_reference(key: torch.Tensor, value: torch.Tensor, tensors: dict, *, seen: int,
                           kv_start: torch.Tensor, head_kind: torch.Tensor, head_slot: torch.Tensor, sink: int,
                           logical_page_size: int) -> None:
    """Store one decode token [B, Hkv, 1, D] of every KV head at slot ``seen - 1``, in place (the contract of
    ``kernels.append``): dense heads into ``dense_key``/``dense_value`` and, for a real token, into its logical
    page's ``key_min``/``key_max``; streaming heads into the ring at ``slot % ring size`` (and ``ring_pos``), and
    into the sink when the token is one of its row's first ``sink`` real tokens. FP8 pages (``key_scale`` among the
    buffers, ``kernels.fp8``): a dense head's token goes to the ring of recent tokens (``recent_*`` at ``slot %
    R``); the first token of a page seals the ring's oldest page, whose place it takes (``quantize_pages``)."""
    slot = seen - 1
    k, v = key[:, :, 0], value[:, :, 0]  # [B, Hkv, D]
    real = (slot >= kv_start)[:, None, None]  # [B, 1, 1]
    dense = torch.nonzero(head_kind == 0).flatten()
    if dense.numel():
        at = head_slot[dense].long()  # each dense head's row in its kind's buffers
        if tensors.get("key_scale") is not None:
            page = tensors["dense_key"].shape[2] // tensors["key_scale"].shape[2]
            for name, x in (("key", k), ("value", v)):
                ring = tensors["recent_" + name]
                size = ring.shape[2]
                if slot % page == 0 and slot >= size:  # the ring's oldest page leaves it: sealed first
                    leaving = torch.arange(slot - size, slot - size + page, device=ring.device)
                    codes, scales = quantize_pages(ring[:, at][:, :, leaving % size], page)
                    tensors["dense_" + name][:, at, slot - size : slot - size + page] = codes
                    tensors[name + "_scale"][:, at, (slot - size) // page] = scales[:, :, 0]
                ring[:, at, slot % size] = x[:, dense]
        else:
            tensors["dense_key"][:, at, slot] = k[:, dense]
            tensors["dense_value"][:, at, slot] = v[:, dense]
        page = slot // logical_page_size
        for name, fn in (("key_min", torch.minimum), ("key_max", torch.maximum)):
            stat = tensors[name][:, at, page]
            tensors[name][:, at, page] = torch.where(real, fn(stat, k[:, dense]), stat)
    stream = torch.nonzero(head_kind == 1).flatten()
    if stream.numel():
        at = head_slot[stream].long()
        ring = slot % tensors["ring_key"].shape[2]
        tensors["ring_key"][:, at, ring] = k[:, stream]
        tensors["ring_value"][:, at, ring] = v[:, stream]
        tensors["ring_pos"][ring] = slot
        rel = slot - kv_start  # [B]: the token's rank among its row's real tokens
        rows = torch.nonzero((rel >= 0) & (rel < sink)).flatten()  # rows where it is a sink token
        if rows.numel():
            rank = rel[rows]
            tensors["sink_key"][rows[:, None], at[None, :], rank[:, None]] = k[rows][:, stream]
            tensors["sink_value"][rows[:, None], at[None, :], rank[:, None]] = v[rows][:, stream]
            tensors["sink_pos"][rows, rank] = slot


def varlen_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                               cu_k: torch.Tensor, *, scale: float, window: tuple[int, int] = (-1, -1),
                               used_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed requests as flash's variable-length attention takes them (``torch.nn.attention.varlen.varlen_attn``):
    query [T_q, Hq, D], key/value [T_k, Hkv, D] (GQA: query head h reads key head h // (Hq / Hkv)), request r's rows
    ``cu_q[r]:cu_q[r+1]`` and keys ``cu_k[r]:cu_k[r+1]``, of which the first ``used_k[r]`` only (when given).
    ``window`` (left, right), -1 for unbounded: with (left, 0) the queries are the last rows of the request's keys
    (bottom-right) and query position p sees keys p - left .. p. Returns (out [T_q, Hq, D], natural-log LSE [T_q,
    Hq], -inf where a row sees no key (its out is 0))."""
    out = torch.zeros_like(query)
    lse = torch.full(query.shape[:2], float("-inf"), dtype=torch.float32, device=query.device)
    group = query.shape[1] // key.shape[1]
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    used = None if used_k is None else used_k.tolist()
    for r in range(len(starts_q) - 1):
        q0, q1, k0 = starts_q[r], starts_q[r + 1], starts_k[r]
        n_k = starts_k[r + 1] - k0 if used is None else used[r]
        if q1 == q0 or n_k <= 0:
            continue
        q = query[q0:q1].transpose(0, 1).float()  # [Hq, n_q, D]
        k = key[k0 : k0 + n_k].transpose(0, 1).float().repeat_interleave(group, 0)
        v = value[k0 : k0 + n_k].transpose(0, 1).float().repeat_interleave(group, 0)
        scores = q @ k.transpose(-1, -2) * scale
        pos = torch.arange(n_k - (q1 - q0), n_k, device=query.device)[:, None]  # bottom-right
        slot = torch.arange(n_k, device=query.device)[None, :]
        seen = torch.ones_like(scores[0], dtype=torch.bool)
        if window[0] >= 0:
            seen &= slot >= pos - window[0]
        if window[1] >= 0:
            seen &= slot <= pos + window[1]
        scores = scores.masked_fill(~seen, float("-inf"))
        row_lse = torch.logsumexp(scores, -1)  # [Hq, n_q]
        probs = torch.where(seen, (scores - row_lse[..., None]).exp(), 0.0)
        out[q0:q1] = (probs @ v).transpose(0, 1).to(query.dtype)
        lse[q0:q1] = row_lse.transpose(0, 1)
    return out, lse


def block_table_decode_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_pages: torch.Tensor,
                                 v_pages: torch.Tensor, block_table: torch.Tensor, cu_k: torch.Tensor,
                                 head_kind: torch.Tensor, *, sink: int, window: int, terms: LogitTerms,
                                 selection: BlockTableSelection | None = None) -> torch.Tensor:
    """A decode step of packed requests over Transformers' paged cache (its decode fast path). Request ``r`` holds
    ``n = cu_k[r + 1] - cu_k[r]`` tokens, the last one new: ``key[r]``/``value[r]`` [Hkv, D] are written at
    position ``n - 1``, i.e. into page ``block_table[r, (n - 1) // P]`` of ``k_pages``/``v_pages`` [num_pages, P,
    Hkv, D] at row ``(n - 1) % P``. Then query ``query[r]`` [Hq, D] (GQA: query head h reads KV head h // (Hq /
    Hkv)) attends to the request's positions ``0 .. n - 1`` read through the table: all of them in a dense KV head
    (``head_kind`` 0); in a streaming one (1) the last ``window`` and the first ``min(sink, n - window)``. A request
    with n = 0 (padding) writes nothing and gives zeros. Returns [R, Hq, D].

    With a ``selection`` (``layout.BlockTableSelection``) whose ``tail_first[r]`` is ``t >= 0``, dense KV head ``h``
    of request ``r`` attends only to position ``p`` (< n) with ``p // page_size`` in ``selection.pages[r, h]`` or
    ``p >= t * page_size``; the caller keeps ``t * page_size <= n - 1``, so the new token is always attended."""
    rows, num_heads, _ = query.shape
    num_kv, page = key.shape[1], k_pages.shape[1]
    group = num_heads // num_kv
    out = torch.zeros_like(query)
    lengths = (cu_k[1:rows + 1] - cu_k[:rows]).tolist()
    streaming = (head_kind == 1).repeat_interleave(group)[:, None]  # per query head
    for r, n in enumerate(lengths):
        if n <= 0:
            continue
        k_pages[block_table[r, (n - 1) // page], (n - 1) % page] = key[r]
        v_pages[block_table[r, (n - 1) // page], (n - 1) % page] = value[r]
        pos = torch.arange(n, device=query.device)
        entries = block_table[r, pos // page]
        k = k_pages[entries, pos % page].transpose(0, 1).float().repeat_interleave(group, 0)  # [Hq, n, D]
        v = v_pages[entries, pos % page].transpose(0, 1).float().repeat_interleave(group, 0)
        scores = capped((k @ query[r].float()[:, :, None])[..., 0] * terms.scale, terms.softcap)  # [Hq, n]
        near = (pos >= n - window) | (pos < min(sink, max(n - window, 0)))
        scores = scores.masked_fill(streaming & ~near[None, :], float("-inf"))
        selected = block_table_selected(selection, r, pos)
        if selected is not None:
            scores = scores.masked_fill(~streaming & ~selected.repeat_interleave(group, 0), float("-inf"))
        probs = softmax_with_sinks(scores, None if terms.sinks is None else terms.sinks[:, None])
        out[r] = (probs[:, :, None] * v).sum(1).to(query.dtype)
    return out


def block_table_selected(selection: BlockTableSelection | None, r: int, pos: torch.Tensor) -> torch.Tensor | None:
    """Bool [Hkv, n]: which of request ``r``'s positions ``pos`` [n] each dense KV head attends under ``selection``
    (``block_table_decode_reference``'s rule), or None where it attends every one."""
    if selection is None or int(selection.tail_first[r]) < 0:
        return None
    listed = (pos // selection.page_size == selection.pages[r, :, :, None]).any(1)  # page in the set
    return listed | (pos >= int(selection.tail_first[r]) * selection.page_size)[None, :]
