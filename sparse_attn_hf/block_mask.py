"""BlockSparseMask: which key blocks each (KV head, query block) attends to, stored compressed.

Memory is proportional to the active blocks (CSR rows per head and query block), never L x L. The
mask only says which blocks are *computed*; causality (bottom-right) and left padding still apply
token by token inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockSparseMask:
    """Active key blocks per (KV head, query block), as CSR rows.

    Attributes:
        offsets: int32 [num_heads, num_q_blocks + 1]; row (h, i) lists ``indices[offsets[h, i]:offsets[h, i+1]]``.
        indices: int32 [nnz], sorted key-block ids within each row.
        block_q, block_k: block sizes in tokens (queries, keys).
        q_len, k_len: the attention shape the mask was made for (queries are the last q_len slots).

    Example:
        >>> mask = BlockSparseMask.random(num_heads=8, q_len=4096, k_len=4096, density=0.25, seed=0)
        >>> mask.density(), mask.to_dense().shape
    """

    offsets: torch.Tensor
    indices: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int

    def __post_init__(self) -> None:
        heads, rows = self.offsets.shape
        if rows != self.num_q_blocks + 1:
            raise ValueError(f"offsets has {rows - 1} query blocks, q_len {self.q_len} / block_q {self.block_q} "
                             f"needs {self.num_q_blocks}.")
        if self.indices.numel() and int(self.indices.max()) >= self.num_k_blocks:
            raise ValueError(f"a key block index is >= the {self.num_k_blocks} key blocks of k_len {self.k_len}.")

    @property
    def num_heads(self) -> int:
        return self.offsets.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.k_len // self.block_k)

    @classmethod
    def from_block_bool(cls, blocks: torch.Tensor, block_q: int, block_k: int, q_len: int, k_len: int):
        """From a bool [num_heads, num_q_blocks, num_k_blocks] block map."""
        heads, n_q, _ = blocks.shape
        counts = blocks.sum(-1).to(torch.int32)
        offsets = torch.zeros(heads, n_q + 1, dtype=torch.int32, device=blocks.device)
        offsets[:, 1:] = counts.cumsum(-1)
        offsets[1:] += offsets[:-1, -1:].cumsum(0)  # rows of all heads in one array
        indices = torch.nonzero(blocks)[:, 2].to(torch.int32)
        return cls(offsets, indices, block_q, block_k, q_len, k_len)

    @classmethod
    def causal_blocks(cls, num_heads: int, q_len: int, k_len: int, block_q: int = 128, block_k: int = 128,
                      device=None) -> torch.Tensor:
        """Bool [num_heads, n_q, n_k]: the blocks that touch the causal (bottom-right) triangle."""
        n_q, n_k = -(-q_len // block_q), -(-k_len // block_k)
        last_q = torch.clamp((torch.arange(n_q, device=device) + 1) * block_q, max=q_len) - 1 + (k_len - q_len)
        first_k = torch.arange(n_k, device=device) * block_k
        return (first_k[None, :] <= last_q[:, None]).expand(num_heads, -1, -1)

    @classmethod
    def random(cls, num_heads: int, q_len: int, k_len: int, density: float, block_q: int = 128,
               block_k: int = 128, seed: int = 0, device=None) -> "BlockSparseMask":
        """Seeded random causal blocks keeping about ``density`` of the causal matrix's elements.

        The diagonal block of every query block is always kept (each query sees itself), so very low
        densities are bounded below by the diagonal's share.
        """
        causal = cls.causal_blocks(num_heads, q_len, k_len, block_q, block_k, device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        keep = torch.rand(causal.shape, generator=gen).to(causal.device) < density
        n_q = causal.shape[1]
        diag = (torch.arange(n_q, device=causal.device) * block_q + (k_len - q_len)) // block_k
        keep[:, torch.arange(n_q), diag.clamp(max=causal.shape[2] - 1)] = True
        return cls.from_block_bool(causal & keep, block_q, block_k, q_len, k_len)

    def full_and_partial(self) -> tuple["BlockSparseMask", "BlockSparseMask"]:
        """The listed blocks split in two masks: *full* blocks lie below the diagonal for every query of
        their query block (no causal mask needed), *partial* ones cross it. Cached."""
        if getattr(self, "_split", None) is None:
            blocks = self.to_block_bool()
            first_q = torch.arange(self.num_q_blocks, device=blocks.device) * self.block_q + (self.k_len - self.q_len)
            last_k = (torch.arange(self.num_k_blocks, device=blocks.device) + 1) * self.block_k - 1
            below = (last_k[None, :] <= first_q[:, None]) & (last_k[None, :] < self.k_len)
            shape = (self.block_q, self.block_k, self.q_len, self.k_len)
            self._split = (BlockSparseMask.from_block_bool(blocks & below, *shape),
                           BlockSparseMask.from_block_bool(blocks & ~below, *shape))
        return self._split

    def to_block_bool(self) -> torch.Tensor:
        """Bool [num_heads, n_q, n_k] block map."""
        blocks = torch.zeros(self.num_heads, self.num_q_blocks, self.num_k_blocks, dtype=torch.bool,
                             device=self.offsets.device)
        counts = (self.offsets[:, 1:] - self.offsets[:, :-1]).flatten().long()
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        blocks.view(-1, self.num_k_blocks)[rows, self.indices.long()] = True
        return blocks

    def to_dense(self) -> torch.Tensor:
        """Bool [num_heads, q_len, k_len]: computed elements (active blocks within the causal triangle)."""
        blocks = self.to_block_bool()
        dense = blocks.repeat_interleave(self.block_q, 1).repeat_interleave(self.block_k, 2)
        dense = dense[:, : self.q_len, : self.k_len]
        q_pos = torch.arange(self.q_len, device=dense.device) + (self.k_len - self.q_len)
        return dense & (torch.arange(self.k_len, device=dense.device)[None, :] <= q_pos[:, None])

    def density(self) -> float:
        """Fraction of the causal matrix's elements that are computed (no L x L tensor is built)."""
        counts = (self.offsets[:, 1:] - self.offsets[:, :-1]).flatten().long().cpu()
        q_block = torch.repeat_interleave(torch.arange(counts.numel()), counts) % self.num_q_blocks
        k_block = self.indices.long().cpu()
        offset = self.k_len - self.q_len
        q0 = q_block * self.block_q
        rows = torch.clamp(q0 + self.block_q, max=self.q_len) - q0
        k0 = k_block * self.block_k
        width = torch.clamp(k0 + self.block_k, max=self.k_len) - k0
        full = (k0 + width - 1) <= (q0 + offset)  # the whole block lies below the diagonal
        computed = float((rows * width)[full].sum())
        for i in range(self.block_q):  # blocks crossing the diagonal: row by row
            q_pos = q0[~full] + i + offset
            live = (q0[~full] + i) < self.q_len
            computed += float(torch.clamp(q_pos - k0[~full] + 1, min=0).minimum(width[~full])[live].sum())
        causal = sum(range(offset + 1, offset + self.q_len + 1))
        return computed / (causal * self.num_heads)

    def to(self, device) -> "BlockSparseMask":
        return BlockSparseMask(self.offsets.to(device), self.indices.to(device), self.block_q, self.block_k,
                               self.q_len, self.k_len)

    def save_picture(self, path, head: int = 0) -> None:
        """A PNG of head ``head``'s computed elements (white), queries down, keys across."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(self.to_dense()[head].cpu().numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(f"head {head}: density {self.density():.3f}")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def __repr__(self) -> str:
        return (f"BlockSparseMask(heads={self.num_heads}, q_len={self.q_len}, k_len={self.k_len}, "
                f"blocks={self.block_q}x{self.block_k}, active={self.indices.numel()}/"
                f"{self.num_heads * self.num_q_blocks * self.num_k_blocks}, density={self.density():.3f})")
