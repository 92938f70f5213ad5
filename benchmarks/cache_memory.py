"""SparseCache bytes against DynamicCache bytes, measured after generate(), next to the prediction.

    python benchmarks/cache_memory.py

A tiny random Llama (4 layers, 8 KV heads of dimension 64, float32) with half of its KV heads
streaming (sink 64, local 256) generates 16 tokens after prompts of several lengths. Prediction:
(1 - s)(1 + 1/16) + s (sink + local) / L, where 1/16 is the key min/max per 16-token logical page
(2 vectors per 16 keys, against 32 vectors of K and V) and L the tokens the cache has seen.
Writes benchmarks/results/cache_memory.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sparse_attn_hf import Profile, SparseConfig, patch_model
from sparse_attn_hf.compat import CACHE_ARG, cache_of

sys.path.insert(0, str(Path(__file__).parent))
from results_io import meta, write_results  # noqa: E402

SINK, LOCAL, NEW = 64, 256, 16


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=16384)
    model = LlamaForCausalLM(config).eval()
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    patch_model(model, Profile.from_scores(model, scores),
                SparseConfig(streaming_fraction=0.5, sink_size=SINK, local_size=LOCAL))
    s = float(model._sparse_attn_state.streaming.float().mean())
    rows = []
    for prompt in (497, 2033, 8177):
        ids = torch.randint(0, 256, (1, prompt))
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 return_dict_in_generate=True)
            cache = cache_of(out)
            dynamic = DynamicCache(config=config)
            model(out.sequences[:, : cache.get_seq_length()], **{CACHE_ARG: dynamic})
        seen = cache.get_seq_length()
        dynamic_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dynamic.layers)
        row = {
            "tokens": seen,
            "streaming_fraction": s,
            "sparse_cache_bytes": cache.nbytes(),
            "dynamic_cache_bytes": dynamic_bytes,
            "ratio": cache.nbytes() / dynamic_bytes,
            "predicted_ratio": (1 - s) * (1 + 1 / 16) + s * (SINK + LOCAL) / seen,
        }
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    write_results(Path(__file__).parent / "results" / "cache_memory",
                  meta(device="cpu", dtype="float32", extra={"sink_size": SINK, "local_size": LOCAL}), rows)


if __name__ == "__main__":
    main()
