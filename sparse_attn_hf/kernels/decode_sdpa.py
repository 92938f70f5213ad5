"""A decode step on a device without the Triton kernel (the CPU): PyTorch SDPA over what the reference says each
head sees (``kernels.reference.decode_visible_tokens``)."""

from __future__ import annotations

import torch

from .layout import BlockTableSelection, DecodeKV, Visibility
from .reference import block_table_selected, decode_visible_tokens, dense_tokens


def paged_decode_sdpa(query, kv: DecodeKV, visible: Visibility, scale: float) -> torch.Tensor:
    """The reference's decode step through SDPA, for a device without the Triton kernel (the CPU): the same
    visible tokens (``decode_visible_tokens``), the dense heads' keys read in place (no gathered copy, and no mask
    while a row sees every stored token), each head kind in one call with its query heads as rows. A kind's
    buffers hold its heads in head order (``head_slot`` is the rank among the kind, ``PatchState.head_tables``),
    so the heads of a kind in ascending order are its buffer's rows."""
    kv_start = visible.kv_start
    batch, num_heads, head_dim = query.shape
    num_kv = kv.head_kind.shape[0]
    q = query.view(batch, num_kv, num_heads // num_kv, head_dim)
    out = torch.empty_like(q)
    # no page chosen, the tail from page 0 and no row padded: the dense heads see every stored token, read in place
    # (FP8 pages: read back in the query's dtype, then the same)
    every = (kv.dense_key is not None and (kv.pages is None or not kv.pages.numel()) and kv.tail_first == 0
             and not bool(kv_start.any()))
    parts = decode_visible_tokens(kv, kv_start, visible.sink, visible.local, dense=not every, dtype=query.dtype)
    if every:
        parts["dense"] = (*dense_tokens(kv, query.dtype), None)
    for kind, (keys, values, seen) in parts.items():
        heads = torch.nonzero(kv.head_kind == (0 if kind == "dense" else 1)).flatten()
        mask = None if seen is None or bool(seen.all()) else seen[:, :, None, :]
        attended = torch.nn.functional.scaled_dot_product_attention(q[:, heads], keys, values, attn_mask=mask,
                                                                    scale=scale)
        out[:, heads] = attended.nan_to_num(0.0)  # a row that sees nothing: zeros, as the reference
    return out.view(batch, num_heads, head_dim)


def block_table_decode_sdpa(query, key, value, k_pages, v_pages, block_table, cu_k, head_kind, *, sink: int,
                            window: int, scale: float, selection: BlockTableSelection | None = None) -> torch.Tensor:
    """``reference.block_table_decode_reference`` (plain logits) through SDPA, for the CPU: the new tokens stored,
    then per request each head kind's visible tokens gathered through the block table once, its query heads as
    rows of one call (GQA: a KV head's group of query heads); a selecting request's dense heads mask what their
    pages leave out (``reference.block_table_selected``)."""
    rows, num_heads, head_dim = query.shape
    num_kv, page = key.shape[1], k_pages.shape[1]
    lengths = (cu_k[1:rows + 1] - cu_k[:rows]).tolist()  # the CPU: a host read costs nothing here
    live = [r for r, n in enumerate(lengths) if n > 0]
    if live:
        last = torch.tensor([lengths[r] - 1 for r in live])
        entries = block_table[live, last // page]
        k_pages[entries, last % page] = key[live]
        v_pages[entries, last % page] = value[live]
    q = query.view(rows, num_kv, num_heads // num_kv, head_dim)
    out = torch.zeros_like(q)
    kinds = [(heads, kind) for kind in (0, 1) if len(heads := torch.nonzero(head_kind == kind).flatten())]
    for r in live:
        n = lengths[r]
        start = max(n - window, 0)
        for heads, kind in kinds:
            pos = torch.arange(n) if kind == 0 else torch.cat([torch.arange(min(sink, start)), torch.arange(start, n)])
            entries, slots = block_table[r, pos // page], pos % page
            keys = k_pages[entries, slots][:, heads].transpose(0, 1)  # [heads, tokens, D]
            values = v_pages[entries, slots][:, heads].transpose(0, 1)
            selected = block_table_selected(selection, r, pos) if kind == 0 else None
            mask = None if selected is None else selected[heads, None, :]
            out[r, heads] = torch.nn.functional.scaled_dot_product_attention(q[r, heads], keys, values,
                                                                             attn_mask=mask, scale=scale)
    return out.view(rows, num_heads, head_dim)
