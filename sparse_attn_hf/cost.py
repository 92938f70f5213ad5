"""The prefill cost model: does a sparse path pay against the best dense kernel?

A sparse prefill runs the package's Triton kernel, a dense one PyTorch SDPA (cuDNN on Hopper). Their
costs per attended element differ, so sparsity pays only below a break-even density. The rates are
measured against cuDNN's causal attention (H200, bf16, head_dim 128, GQA 4; benchmarks/NOTES.md,
"The prefill cost model"):

* ``BLOCK_RATE``: the Triton kernel over whole key blocks (a streaming head's sink and window, a
  SampleAttention window): 486-498 TFLOP/s against cuDNN's 565-592 at 32K-1M keys (1.2x), worse on
  short sequences (1.56x at 8K, where its grid is small);
* ``GATHER_RATE``: SampleAttention's gathered stripe columns, about twice the block rate.

Block-or-gather: a key block that holds at least ``WHOLE_BLOCK_SHARE`` of its columns as stripes costs less
visited whole (at the block rate, its other columns masked) than gathered column by column, so the kernel
visits it whole (``kernels.prefill``) and the cost model charges it that way. Measured (H200, 32K and 128K,
stripes clustered in blocks; benchmarks/NOTES.md): a gathered tile of 128 stripes costs about 1.25 block
tiles, so whole visits pay from about 100 stripes of 128 (128: -8 to -13%, 112: -3 to -6%, 96: +2 to +4%).

A sparse path runs when its predicted cost is at most ``MARGIN`` of dense attention's: it also pays a
second launch and the gathers of queries and outputs, which the rates leave out.
"""

from __future__ import annotations

import torch

BLOCK_RATE = 1.25
GATHER_RATE = 2.5
MARGIN = 0.8
WHOLE_BLOCK_SHARE = 0.8  # share of a key block's columns as stripes from which a whole visit costs less
KEY_BLOCK = 128  # the prefill kernel's key block at head_dim <= 128


def causal_elements(q_first: int, q_len: int) -> float:
    """Visible (query, key) pairs of causal attention for query slots q_first .. q_first + q_len - 1."""
    return q_len * q_first + q_len * (q_len + 1) / 2


def window_elements(q_first: int, q_len: int, span: int) -> float:
    """Pairs a row sees when it sees at most ``span`` keys (sink + local of a streaming head)."""
    short = min(max(span - q_first, 0), q_len)  # rows with fewer than ``span`` keys: they see them all
    return causal_elements(q_first, short) + (q_len - short) * span


def streaming_pays(q_first: int, q_len: int, sink: int, local: int) -> bool:
    """Whether streaming heads' sink + window beats dense attention on the same heads. For one-shot
    prefill with LServe's sink 128 + local 4096 the break-even lies near 10.5K tokens: at 8K the window
    still covers 77% of causal attention."""
    return BLOCK_RATE * window_elements(q_first, q_len, sink + local) <= MARGIN * causal_elements(q_first, q_len)


def stripe_cost(mask, q_first: int) -> tuple[float, float]:
    """(density, predicted cost relative to dense attention) of a SampleAttention mask over all its
    (row, KV head) pairs. One host synchronization (the caller needs the answer on the host)."""
    q_len = mask.q_len
    window = mask.window.to(torch.float64)  # [B, H]
    # window pairs: each row sees min(its keys, window), as window_elements (padding ignored: an upper bound)
    short = (window - q_first).clamp(min=0, max=q_len)
    in_window = short * q_first + short * (short + 1) / 2 + (q_len - short) * window
    # stripe pairs: column j is seen outside the window by rows p >= j + window (padding stripes are k_len)
    stripes = mask.stripes.to(torch.float64)
    seen = (q_first + q_len - stripes - window[..., None]).clamp(min=0, max=q_len)
    # a stripe in a block dense with stripes costs its share of the whole block's visit
    per_block, block_of = mask.stripes_per_block(KEY_BLOCK)
    in_block = per_block.gather(-1, block_of).to(torch.float64)
    rate = torch.where(in_block >= WHOLE_BLOCK_SHARE * KEY_BLOCK, BLOCK_RATE * KEY_BLOCK / in_block, GATHER_RATE)
    totals = torch.stack([(in_window + seen.sum(-1)).sum(),
                          (BLOCK_RATE * in_window).sum() + (rate * seen).sum()]).tolist()
    dense = causal_elements(q_first, q_len) * window.numel()
    return totals[0] / dense, totals[1] / dense
