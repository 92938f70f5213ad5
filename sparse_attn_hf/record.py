"""What the last call of a patched model ran: per layer in prefill, per step in decode, and the cache's bytes.

    >>> out = model.generate(**inputs, max_new_tokens=32)
    >>> print(sparse_attn_hf.last_call(model))
    prefill: 30 layers; streaming heads on their sink + window in 30; dense heads: dense in 30
    decode: 31 steps, 29 replayed from a CUDA graph, 2 eager (warm-up before the capture: 2)
    cache: 41.2 MiB (a DynamicCache would hold 92.8 MiB: 0.44x)

The decisions that cost the user nothing they asked for (a short prompt run dense, a SampleAttention mask too
dense to pay) are recorded here rather than warned about; the ones that lose speed or memory the user asked for
are also logged once as a WARNING (``_log.warn_once``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LayerPrefill:
    """What one layer's last prefill forward ran."""

    streaming_heads: int  # KV heads on their sink + window (0 when the window was not applied)
    dense_heads: int  # KV heads over every key
    dense_method: str = "dense"  # "dense" or "sample_attention"
    density: float | None = None  # SampleAttention's mask density (fraction of the causal matrix), when sampled
    note: str | None = None  # why the layer ran differently from its labels (a short prompt, a mask too dense)


@dataclass
class CallRecord:
    """The record of one ``generate()`` call (or of the forwards since the last one) of a patched model."""

    prefill: dict[int, LayerPrefill] = field(default_factory=dict)
    decode_steps: int = 0  # one-token decode steps (page selection, decode window)
    graph_steps: int = 0  # of which replayed from a CUDA graph
    eager_reasons: Counter = field(default_factory=Counter)  # why the other decode steps ran eagerly
    cache_bytes: int | None = None  # SparseCache bytes at the end of the call
    dynamic_cache_bytes: int | None = None  # what a DynamicCache would hold for the same tokens
    stock: str | None = None  # why (part of) the call ran as stock Transformers, if it did (``routing``)
    decode_note: str | None = None  # how decode steps differed from the settings (no page selection on a CPU)

    def eager(self, reason: str) -> None:
        self.eager_reasons[reason] += 1

    def as_dict(self) -> dict:
        layers = self.prefill.values()
        return {
            "prefill_layers": len(self.prefill),
            "prefill_streaming_layers": sum(1 for p in layers if p.streaming_heads),
            "prefill_sample_attention_layers": sum(1 for p in layers if p.dense_method == "sample_attention"),
            "prefill_notes": sorted({p.note for p in layers if p.note}),
            "decode_steps": self.decode_steps,
            "graph_steps": self.graph_steps,
            "eager_reasons": dict(self.eager_reasons),
            "cache_bytes": self.cache_bytes,
            "dynamic_cache_bytes": self.dynamic_cache_bytes,
            "stock": self.stock,
            "decode_note": self.decode_note,
        }

    def summary(self) -> str:
        """One line: layers that streamed or sampled in prefill, graph steps of decode, cache ratio."""
        layers = list(self.prefill.values())
        parts = [f"stock ({self.stock})"] if self.stock else []
        if layers:
            sampled = sum(1 for p in layers if p.dense_method == "sample_attention")
            parts.append(f"prefill: window in {sum(1 for p in layers if p.streaming_heads)}/{len(layers)} layers, "
                         f"SampleAttention in {sampled}")
        if self.decode_steps:
            parts.append(f"decode: {self.graph_steps}/{self.decode_steps} steps from a CUDA graph")
        if self.cache_bytes is not None and self.dynamic_cache_bytes:
            parts.append(f"cache {self.cache_bytes / self.dynamic_cache_bytes:.2f}x a DynamicCache")
        return "; ".join(parts) or "nothing recorded"

    def __str__(self) -> str:
        lines = [f"served as stock Transformers: {self.stock}"] if self.stock else []
        if self.prefill:
            layers = list(self.prefill.values())
            streaming = sum(1 for p in layers if p.streaming_heads)
            sampled = [p for p in layers if p.dense_method == "sample_attention"]
            dense_text = f"dense in {len(layers) - len(sampled)}"
            if sampled:
                mean = sum(p.density for p in sampled) / len(sampled)
                dense_text += f", SampleAttention in {len(sampled)} (mean density {mean:.2f})"
            lines.append(f"prefill: {len(layers)} layers; streaming heads on their sink + window in {streaming}; "
                         f"dense heads: {dense_text}")
            for note in sorted({p.note for p in layers if p.note}):
                lines.append(f"  note: {note}")
        else:
            lines.append("prefill: none recorded")
        if self.decode_steps:
            eager = self.decode_steps - self.graph_steps
            reasons = "; ".join(f"{r}: {n}" for r, n in self.eager_reasons.items())
            lines.append(f"decode: {self.decode_steps} steps, {self.graph_steps} replayed from a CUDA graph, {eager} "
                         f"eager" + (f" ({reasons})" if reasons else ""))
            if self.decode_note:
                lines.append(f"  note: {self.decode_note}")
        else:
            lines.append("decode: no decode step")
        if self.cache_bytes is not None:
            ratio = f": {self.cache_bytes / self.dynamic_cache_bytes:.2f}x" if self.dynamic_cache_bytes else ""
            lines.append(f"cache: {self.cache_bytes / 2**20:.1f} MiB (a DynamicCache would hold "
                         f"{(self.dynamic_cache_bytes or 0) / 2**20:.1f} MiB{ratio})")
        return "\n".join(lines)


def last_call(model) -> CallRecord:
    """The record of the last ``generate()`` call of a model patched by ``patch_model`` (or of its forwards since):
    what each layer ran in prefill, how many decode steps were replayed from a CUDA graph and why the others were
    not, and the cache's bytes against a DynamicCache's. ``print(last_call(model))`` reads it."""
    state = getattr(model, "_sparse_attn_state", None)
    if state is None:
        raise ValueError("this model is not patched by sparse_attn_hf: call patch_model(model) first.")
    return state.record


__all__ = ["CallRecord", "LayerPrefill", "last_call"]
