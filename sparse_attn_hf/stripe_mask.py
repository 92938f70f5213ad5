"""StripeMask: SampleAttention's mask per (batch row, KV head): a local window plus key columns.

Query slot ``i`` sees key ``j`` when ``j`` is a real token, ``j <= i`` and either ``i - j < window`` (the
local window) or ``j`` is one of the head's *stripes* (key columns every query sees). Stored as sorted
column lists: memory proportional to the stripes, never L x L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StripeMask:
    """Window + column stripes per (batch row, KV head).

    Attributes:
        window: int64 [B, H], the local window in tokens (the query itself included).
        stripes: int32 [B, H, K], sorted column indices; entries past ``counts`` hold ``k_len``.
        counts: int32 [B, H], stripes in use per row and head.
        q_len, k_len: the attention shape (queries are the last q_len slots).
        kv_start: int64 [B], first real slot of each row.

    Example:
        >>> mask = sample_attention_mask(query, key, ...)   # methods/sample_attention.py
        >>> print(mask); mask.density(); mask.save_picture("head0.png", head=0)
    """

    window: torch.Tensor
    stripes: torch.Tensor
    counts: torch.Tensor
    q_len: int
    k_len: int
    kv_start: torch.Tensor

    @property
    def num_heads(self) -> int:
        return self.stripes.shape[1]

    def columns(self, b: int = 0) -> torch.Tensor:
        """Bool [H, k_len]: which key columns are stripes for batch row ``b``."""
        out = torch.zeros(self.num_heads, self.k_len + 1, dtype=torch.bool, device=self.stripes.device)
        out.scatter_(1, self.stripes[b].long().clamp(max=self.k_len), True)
        return out[:, : self.k_len]

    def to_dense(self, b: int = 0) -> torch.Tensor:
        """Bool [H, q_len, k_len]: the visible elements of batch row ``b`` (small shapes only)."""
        q = torch.arange(self.k_len - self.q_len, self.k_len, device=self.stripes.device)[:, None]
        k = torch.arange(self.k_len, device=self.stripes.device)[None, :]
        real_causal = (k <= q) & (k >= self.kv_start[b])
        in_window = (q - k)[None] < self.window[b].view(-1, 1, 1)
        return real_causal[None] & (in_window | self.columns(b)[:, None, :])

    def stripes_per_block(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """How the stripes fall into key blocks of ``block`` columns: (int32 [B, H, n_blocks + 1], stripes per
        block, the last column counting padding entries; int64 [B, H, K], each entry's block, padding in the
        last column). Block-or-gather decides with it (the prefill kernel's arguments, the cost model)."""
        num_blocks = -(-self.k_len // block)
        block_of = torch.where(self.stripes < self.k_len, self.stripes // block, num_blocks).long()
        per_block = torch.zeros(*block_of.shape[:2], num_blocks + 1, dtype=torch.int32, device=block_of.device)
        return per_block.scatter_add_(-1, block_of, torch.ones_like(block_of, dtype=torch.int32)), block_of

    def density(self) -> float:
        """Computed share of the causal matrix (all rows, heads and batch rows), in O(K) per head."""
        first = self.k_len - self.q_len
        q = torch.arange(first, self.k_len, dtype=torch.float64, device=self.stripes.device)
        causal = float((q + 1).sum())
        total = 0.0
        for b in range(self.stripes.shape[0]):
            for h in range(self.num_heads):
                w = int(self.window[b, h])
                total += float(torch.clamp(q + 1, max=w).sum())  # window elements per row
                cols = self.stripes[b, h, : int(self.counts[b, h])].double()
                # rows i >= first with i - j >= w see stripe j outside the window
                rows = (self.k_len - torch.maximum(cols + w, torch.tensor(float(first)))).clamp(min=0)
                total += float(rows.sum())
        return total / (causal * self.stripes.shape[0] * self.num_heads)

    def save_picture(self, path, b: int = 0, head: int = 0, max_side: int = 1024) -> None:
        """A PNG of one head's mask (rows = queries, columns = keys), pooled to at most ``max_side``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        dense = self.to_dense(b)[head].float()
        step = max(1, -(-max(dense.shape) // max_side))
        pooled = torch.nn.functional.max_pool2d(dense[None, None], step, step, ceil_mode=True)[0, 0]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(pooled.cpu(), cmap="Greys", interpolation="nearest", aspect="auto")
        ax.set_title(f"SampleAttention mask, row {b}, KV head {head}: window {int(self.window[b, head])}, "
                     f"{int(self.counts[b, head])} stripes", fontsize=8)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def __repr__(self) -> str:
        counts = self.counts.float()
        return (f"StripeMask(batch={self.stripes.shape[0]}, heads={self.num_heads}, q_len={self.q_len}, "
                f"k_len={self.k_len}, window={self.window.flatten()[0].item()}, stripes per head "
                f"min/mean/max={int(counts.min())}/{counts.mean().item():.1f}/{int(counts.max())}, "
                f"density={self.density():.3f})")
