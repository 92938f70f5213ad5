"""Next-token agreement of sparse and dense attention over a long real text."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import patched


@torch.no_grad()
def _final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids.to(model.device)).last_hidden_state[0]


@torch.no_grad()
def next_token_agreement(model, input_ids: torch.Tensor, settings, chunk: int = 512) -> list[dict]:
    """Compare the model as given (dense) with the model patched by each ``(profile, config)``.

    Returns one ``{"tokens", "top1_agreement", "mean_kl", "max_kl"}`` per setting: the share of
    positions where both predict the same next token, and KL(dense || sparse) of the next-token
    distributions in nats. Logits are made chunk by chunk (memory ``chunk x vocab``).
    """
    dense_hidden = _final_hidden(model, input_ids)
    head = model.get_output_embeddings()
    results = []
    for profile, config in settings:
        with patched(model, profile, config):
            sparse_hidden = _final_hidden(model, input_ids)
        agree, kls = 0, []
        for start in range(0, dense_hidden.shape[0], chunk):
            dense_logp = F.log_softmax(head(dense_hidden[start : start + chunk]).float(), dim=-1)
            sparse_logp = F.log_softmax(head(sparse_hidden[start : start + chunk]).float(), dim=-1)
            agree += int((dense_logp.argmax(-1) == sparse_logp.argmax(-1)).sum())
            kls.append((dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1))
        kl = torch.cat(kls)
        results.append({
            "tokens": int(input_ids.shape[1]),
            "top1_agreement": agree / kl.numel(),
            "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()),
        })
    return results
