"""Attention statistics per (layer, query head), measured with dense attention on real inputs.

Two signals decide whether a head may stream (keep only sink + local window):

* **out-of-window mass**: on plain text, the average attention probability a head puts outside the
  first ``sink`` tokens and its last ``local`` tokens (rows past ``sink + local`` only). Diffuse heads
  score high.
* **needle mass**: on passkey prompts followed by their answer, the attention probability the rows
  that predict the answer's tokens put on the needle. Retrieval heads score high, even when their
  average pattern looks local.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

_PROBE = "sparse_attn_hf_probe"


class _Recorder:
    def __init__(self):
        self.handler = None  # fn(layer_idx, probs [B, Hq, Lq, Lk])
        self.windows: list = []  # per layer: None, or a native window (models.layer_windows)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        window = self.windows[module.layer_idx] if self.windows else None
        if attention_mask is not None and window is None:  # a window layer's mask is its window, rebuilt here
            raise ValueError("attention statistics take one unpadded sequence at a time.")
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1).float()
        v = value.repeat_interleave(groups, dim=1).float()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
        q_len, k_len = scores.shape[-2:]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        if window is not None:  # the model's own window: key j seen by query i when i - j < window
            causal &= ~torch.ones_like(causal).tril(k_len - q_len - window)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        self.handler(module.layer_idx, probs)
        return torch.matmul(probs, v).to(query.dtype).transpose(1, 2), None


_recorder = _Recorder()


@contextlib.contextmanager
def _probing(model, handler):
    from ..models import layer_windows

    AttentionInterface.register(_PROBE, _recorder.attention)
    previous = model.config._attn_implementation
    _recorder.handler, _recorder.windows = handler, layer_windows(model.config)
    model.set_attn_implementation(_PROBE)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _recorder.handler = None


@torch.no_grad()
def out_of_window_mass(model, input_ids: torch.Tensor, sink: int, local: int) -> torch.Tensor:
    """float [num_layers, num_heads]: mean attention mass outside sink + local window, rows past both."""
    length = input_ids.shape[1]
    if length <= sink + local:
        raise ValueError(f"the text ({length} tokens) must be longer than sink + local = {sink + local}.")
    result = {}
    pos = torch.arange(length)
    inside = (pos[None, :] < sink) | (pos[:, None] - pos[None, :] < local)  # [Lq, Lk]

    def handler(layer, probs):
        rows = probs[0, :, sink + local :]  # [H, rows, Lk]
        kept = (rows * inside[sink + local :].to(rows.device)).sum(-1)
        result[layer] = (1.0 - kept).mean(-1).cpu()

    with _probing(model, handler):
        model(input_ids.to(model.device), use_cache=False)
    return torch.stack([result[layer] for layer in sorted(result)])


@torch.no_grad()
def needle_mass(model, input_ids: torch.Tensor, needle: slice, rows: slice) -> torch.Tensor:
    """float [num_layers, num_heads]: mean attention mass of query ``rows`` on the ``needle`` tokens.

    For retrieval, ``input_ids`` is a passkey prompt followed by its answer (teacher forcing) and
    ``rows`` are the positions that predict the answer's tokens.
    """
    result = {}

    def handler(layer, probs):
        result[layer] = probs[0, :, rows, needle].sum(-1).mean(-1).cpu()

    with _probing(model, handler):
        model(input_ids.to(model.device), use_cache=False)
    return torch.stack([result[layer] for layer in sorted(result)])


def per_kv_head(values: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[layers, heads] -> [layers, kv_heads]: the most demanding query head of each GQA group."""
    layers, heads = values.shape
    return values.view(layers, num_kv_heads, heads // num_kv_heads).amax(-1)


def rank_normalize(values: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to [0, 1] (ties ordered by position, deterministic)."""
    flat = values.flatten()
    ranks = torch.empty_like(flat)
    ranks[torch.sort(flat, stable=True).indices] = torch.arange(flat.numel(), dtype=flat.dtype)
    return (ranks / max(flat.numel() - 1, 1)).view_as(values)


SIGNALS = {
    "needle": "rank(needle mass at the rows predicting the answer)",
    "window": "rank(out-of-window mass on text)",
    "combined": "max(rank(out-of-window mass), rank(needle mass))",
}


def stats_scores(model, calibration, samples, sink: int, local: int, signal: str = "needle",
                 text_tokens: int = 2048, progress=None) -> torch.Tensor:
    """Head scores [num_layers, num_kv_heads] in [0, 1] from attention statistics (dense attention).

    ``needle`` (default): rank of the attention mass on the needle at the rows that predict the
    teacher-forced answer of each passkey ``sample`` (mean over samples), per KV head the most
    demanding query head of its group. ``window``: rank of the out-of-window mass on the first
    ``text_tokens`` tokens of the calibration text. ``combined``: the larger rank of the two
    (benchmarks/NOTES.md compares them on the default model: ``needle`` keeps the most answers).
    Ranks order equal values by (layer, head), so the result is deterministic.
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {sorted(SIGNALS)}, got {signal!r}.")
    config = model.config.get_text_config(decoder=True)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    ranks = {}
    if signal in ("window", "combined"):
        ids = torch.tensor([calibration.tokens[: min(text_tokens, calibration.prompt_tokens)]])
        ranks["window"] = rank_normalize(per_kv_head(out_of_window_mass(model, ids, sink, local), kv_heads))
    if signal in ("needle", "combined"):
        if not samples:
            raise ValueError("the needle signal needs at least one passkey sample.")
        masses = []
        for sample in samples:
            masses.append(needle_mass(model, sample.input_ids, sample.needle, sample.answer_rows))
            if progress is not None:
                progress.update(1)
        ranks["needle"] = rank_normalize(per_kv_head(torch.stack(masses).mean(0), kv_heads))
    if signal == "combined":
        return torch.maximum(ranks["window"], ranks["needle"])
    return ranks[signal]
