"""Left padding: where each batch row's real tokens start."""

from __future__ import annotations

import torch


def left_padding_starts(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """First real slot of each row, int64 [batch], from a 2D padding mask [batch, length].

    ``None`` means no padding (all zeros). Only left padding is supported: a mask whose real tokens
    are not one block at the right end of the row raises ``ValueError``.
    """
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"expected a 2D padding mask of shape [batch, keys] = [{batch}, {length}], got "
            f"{tuple(attention_mask.shape)}. A fixed-size cache (StaticCache, sliding-window caches) is not "
            "supported: let generate() build a SparseCache, or pass a DynamicCache or a SparseCache."
        )
    mask = attention_mask.to(device=device, dtype=torch.bool)
    starts = (~mask).sum(dim=-1)
    expected = torch.arange(length, device=device)[None, :] >= starts[:, None]
    if not torch.equal(mask, expected):
        raise ValueError(
            "the attention mask is not left padding (each row: pads first, then only real tokens). "
            "Set tokenizer.padding_side = 'left' for batched generation."
        )
    return starts  # a row with no real token yet (a chunk of pads) gets ``length``
