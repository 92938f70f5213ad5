"""SampleAttention for the dense heads in prefill: a local window plus key-column stripes, chosen per
(batch row, KV head) so that the sampled queries keep at least ``alpha`` of their attention.

1. Sample query rows: every ``1 / r_row``-th row plus the last rows (they ask the question).
2. Their exact attention over all keys, summed per key column over the rows and the GQA group's query
   heads, *outside* each row's window (``ops.sampled_column_scores``): ``col[j]``. Since each row's
   attention sums to 1, the window keeps ``rows - sum(col)`` of the mass.
3. Stripes: the fewest top columns whose ``col`` brings the mean kept mass over the sampled rows to
   ``alpha`` (the paper's practical criterion; exact, since stripes and windows do not overlap in
   ``col``). ``criterion="min"`` instead requires every sampled row to keep ``alpha`` (the strict CRA).
4. The first real key of each row (the attention sink) is always a stripe, even where the window alone
   reaches ``alpha``: rows far from it would otherwise lose the token most heads lean on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import cost, ops
from ..ops import LogitTerms, Visibility
from ..stripe_mask import StripeMask

TAIL_ROWS = 64  # the last query rows are always sampled


def sample_rows(q_len: int, r_row: float, device=None) -> torch.Tensor:
    """Sorted query indices: every ``round(1 / r_row)``-th row, plus the last ``TAIL_ROWS`` rows."""
    stride = max(1, round(1 / r_row))
    strided = torch.arange(0, q_len, stride, device=device)
    tail = torch.arange(max(0, q_len - TAIL_ROWS), q_len, device=device)
    return torch.unique(torch.cat([strided, tail]))


def window_size(rw: float, k_len: int) -> int:
    return max(1, math.ceil(rw * k_len))


def choose_stripes(col: torch.Tensor, row_mass: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean criterion. col float32 [B, H, Lk] (mass outside the windows), row_mass [B, H] (the sampled
    rows' total mass). Returns (stripes int32 [B, H, K] sorted, padded with Lk; counts int32 [B, H])."""
    k_len = col.shape[-1]
    ranked = torch.sort(col, dim=-1, descending=True, stable=True)  # one sort serves the count and the columns
    if alpha >= 1.0:
        counts = torch.full(col.shape[:2], k_len, dtype=torch.int32, device=col.device)
    else:
        need = alpha * row_mass - (row_mass - col.sum(-1))  # what the stripes must add to the windows' mass
        counts = ((ranked.values.cumsum(-1) < need[..., None]).sum(-1) + 1).clamp(max=k_len)
        counts = torch.where(need <= 0, 0, counts).to(torch.int32)
    return _top_columns(col, counts, ranked.indices), counts


def _top_columns(col: torch.Tensor, counts: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """The ``counts`` top columns of ``col`` per (row, head), sorted, padded with k_len (``order``: col's
    indices ranked by descending value, if already sorted)."""
    k_len = col.shape[-1]
    width = max(int(counts.max()), 1)
    if order is None:
        order = torch.sort(col, dim=-1, descending=True, stable=True).indices  # ties: lower column first
    order = order[..., :width]
    keep = torch.arange(width, device=col.device) < counts[..., None]
    return torch.sort(torch.where(keep, order, k_len), dim=-1).values.to(torch.int32)


def _with_sink_column(stripes, counts, kv_start, k_len: int):
    """Add each row's first real key to its stripes where it is missing (sorted order and padding kept)."""
    sink = kv_start.to(stripes.dtype)[:, None, None].expand(*stripes.shape[:2], 1)
    has = (stripes == sink).any(-1)
    extra = torch.where(has[..., None], torch.full_like(sink, k_len), sink)
    stripes = torch.sort(torch.cat([stripes, extra], dim=-1), dim=-1).values
    return stripes, counts + (~has).to(counts.dtype)


def _row_kept_mass(query, key, *, rows, q_first, kv_start, window, columns, scale) -> torch.Tensor:
    """Kept mass of every sampled row [B, Hq, n] under window + ``columns`` (bool [B, Hkv, Lk])."""
    batch, num_heads, _, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv
    q_pos = q_first + rows
    k_pos = torch.arange(k_len, device=key.device)
    q = query[:, :, rows].float().view(batch, num_kv, groups, rows.numel(), head_dim)
    scores = torch.einsum("bhgnd,bhkd->bhgnk", q, key.float()) * scale
    visible = (k_pos[None, None, :] <= q_pos[None, :, None]) & (k_pos[None, None, :] >= kv_start[:, None, None])
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None], float("-inf")), dim=-1).nan_to_num(0.0)
    kept = ((q_pos[None, None, :, None] - k_pos) < window[:, :, None, None]) | columns[:, :, None, :]
    return (probs * kept[:, :, None]).sum(-1).reshape(batch, num_heads, rows.numel())


def _strict_counts(query, key, col, *, rows, q_first, kv_start, window, alpha, scale) -> torch.Tensor:
    """Smallest count per (row, head) whose top columns give every sampled real row >= alpha (bisection)."""
    batch, num_kv, k_len = col.shape
    groups = query.shape[1] // num_kv
    order = torch.sort(col, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(k_len, device=col.device).expand_as(order))
    real = (q_first + rows)[None, :] >= kv_start[:, None]  # [B, n]
    low = torch.zeros(batch, num_kv, dtype=torch.long, device=col.device)
    high = torch.full_like(low, k_len)
    while bool((low < high).any()):
        mid = (low + high) // 2
        kept = _row_kept_mass(query, key, rows=rows, q_first=q_first, kv_start=kv_start, window=window,
                              columns=rank < mid[..., None], scale=scale)
        kept = kept.view(batch, num_kv, groups, -1).masked_fill(~real[:, None, None], 1.0)
        ok = kept.amin(dim=(2, 3)) >= alpha
        high = torch.where(ok & (low < high), mid, high)
        low = torch.where(~ok & (low < high), mid + 1, low)
    return low.to(torch.int32)


@dataclass(frozen=True)
class SampleSettings:
    """SampleAttention's settings (``SparseConfig``'s ``alpha``, ``rw``, ``r_row``, ``cra_criterion``): the
    attention mass a mask keeps, the window as a share of the keys, the share of query rows sampled, and whether
    the mass is kept on average over a row's heads ("mean") or by every sampled row ("min")."""

    alpha: float
    rw: float
    r_row: float
    criterion: str = "mean"


def sample_attention_mask(query, key, visible: Visibility, terms: LogitTerms, settings: SampleSettings) -> StripeMask:
    """The SampleAttention mask of the dense heads of one layer (see the module docstring).

    query [B, Hq, Lq, D] at slots ``visible.q_first + i``; key [B, Hkv, Lk, D]; ``visible.kv_start`` [B].
    ``terms``: the logit terms of ``kernels.reference`` (with learned sinks a row's keys hold less than its whole
    mass, so the "mean" criterion's target, alpha of the whole, keeps at least as many stripes as needed)."""
    q_first, kv_start, scale = visible.q_first, visible.kv_start, terms.scale
    alpha, rw, r_row, criterion = settings.alpha, settings.rw, settings.r_row, settings.criterion
    if criterion == "min" and not terms.plain:
        raise ValueError("cra_criterion='min' does not compute learned sinks or soft-capping; use 'mean'.")
    batch, num_heads, q_len, _ = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    rows = sample_rows(q_len, r_row, device=query.device)
    window = torch.full((batch, num_kv), window_size(rw, k_len), dtype=torch.long, device=query.device)
    col = ops.sampled_column_scores(query, key, visible, terms, rows=rows, window=window)
    real_rows = ((q_first + rows)[None, :] >= kv_start[:, None]).sum(-1).float()  # [B]
    row_mass = (real_rows * (num_heads // num_kv))[:, None].expand(batch, num_kv)
    if criterion == "mean":
        stripes, counts = choose_stripes(col, row_mass, alpha)
    elif criterion == "min":
        counts = _strict_counts(query, key, col, rows=rows, q_first=q_first, kv_start=kv_start, window=window,
                                alpha=alpha, scale=scale)
        stripes = _top_columns(col, counts)
    else:
        raise ValueError(f"criterion must be 'mean' or 'min', got {criterion!r}.")
    stripes, counts = _with_sink_column(stripes, counts, kv_start, k_len)
    return StripeMask(window=window, stripes=stripes, counts=counts, q_len=q_len, k_len=k_len, kv_start=kv_start)


@dataclass(frozen=True)
class SampleChoice:
    """SampleAttention's decision for one layer's dense heads: its mask, the mask's density over the causal
    matrix, the cost model's predicted cost relative to dense attention, and whether the mask pays (runs)."""

    mask: StripeMask
    density: float
    predicted_cost: float
    sparse: bool


def choose_mask(query, key, visible: Visibility, terms: LogitTerms, settings: SampleSettings) -> SampleChoice:
    """The layer's mask (``sample_attention_mask``) and whether it pays against dense attention (``cost``: one
    host synchronization, the decision is made on the host)."""
    mask = sample_attention_mask(query, key, visible, terms, settings)
    density, predicted = cost.stripe_cost(mask, visible.q_first)
    return SampleChoice(mask, density, predicted, predicted <= cost.MARGIN)
