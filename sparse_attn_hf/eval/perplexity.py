"""Perplexity of dense and sparse attention on a long text, with next-token agreement and KL.

One dense forward and one sparse forward per setting: :func:`.agreement.next_token_agreement` runs
them, and a forward hook on the decoder keeps their final hidden states for the perplexities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .agreement import next_token_agreement


@torch.no_grad()
def perplexity_from_hidden(model, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int = 512) -> float:
    """exp(mean NLL) of tokens 1..n-1 given final hidden states [n, hidden] of ``input_ids`` [1, n]."""
    head = model.get_output_embeddings()
    targets = input_ids[0, 1:].to(hidden.device)
    nll = 0.0
    for start in range(0, targets.numel(), chunk):
        logits = head(hidden[start : start + chunk][: targets.numel() - start]).float()
        nll += float(F.cross_entropy(logits, targets[start : start + chunk], reduction="sum"))
    return math.exp(nll / targets.numel())


@torch.no_grad()
def perplexity_rows(model, input_ids: torch.Tensor, settings, chunk: int = 512) -> list[dict]:
    """One record per ``(profile, config)``: ``next_token_agreement``'s fields (tokens, top1_agreement,
    mean_kl, max_kl) plus dense_ppl, sparse_ppl and their ratio. ``input_ids`` [1, n], n >= 2."""
    if input_ids.shape[1] < 2:
        raise ValueError("perplexity needs a text of at least 2 tokens.")
    hidden: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(
        lambda module, args, output: hidden.append(output.last_hidden_state[0].detach()))
    try:
        results = next_token_agreement(model, input_ids, settings, chunk=chunk)
    finally:
        hook.remove()
    if len(hidden) != 1 + len(settings):
        raise RuntimeError(f"expected {1 + len(settings)} decoder forwards from next_token_agreement, "
                           f"saw {len(hidden)}.")
    dense_ppl = perplexity_from_hidden(model, hidden[0], input_ids, chunk)
    rows = []
    for result, sparse_hidden in zip(results, hidden[1:]):
        sparse_ppl = perplexity_from_hidden(model, sparse_hidden, input_ids, chunk)
        rows.append({**result, "dense_ppl": dense_ppl, "sparse_ppl": sparse_ppl,
                     "ppl_ratio": sparse_ppl / dense_ppl})
    return rows
