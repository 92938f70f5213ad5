"""Chunked prefill on a GPU through generate(): equal to one-shot prefill, and a 128K prompt on an 8B model.

    python benchmarks/e2e/chunked_prefill_gpu.py [--length 131072] [--chunk 8192]

1. Equality: a 2-layer model of the Llama-3-8B shape (random bf16 weights, half the KV heads streaming,
   sink 128 + local 4096) greedily generates 8 tokens after a 12K-token prompt, once with
   ``prefill_chunk_size`` and once in one piece; the tokens must match and the first-step logits agree.
2. Size: the full 32-layer Llama-3-8B shape (random bf16 weights) generates 4 tokens after a
   ``--length`` prompt with ``prefill_chunk_size=--chunk``; peak GPU memory, time and the cache's bytes
   are recorded, patched (50% streaming) and with every head dense, after a short warm-up generate
   (Triton compiles its kernels on first use).
Writes benchmarks/results/chunked_prefill_gpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sparse_attn_hf import Profile, SparseConfig, patch_model, unpatch_model
from sparse_attn_hf.compat import cache_of

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common.llama8b import build  # noqa: E402
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

SETTINGS = SparseConfig(streaming_fraction=0.5, sink_size=128, local_size=4096)


def patch(model, fraction: float):
    scores = torch.rand(model.config.num_hidden_layers, 8, generator=torch.Generator().manual_seed(1))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(
        streaming_fraction=fraction, sink_size=SETTINGS.sink_size, local_size=SETTINGS.local_size))


@torch.no_grad()
def equality(length: int = 12288, chunk: int = 4096) -> dict:
    model = build(2, length + 64)
    patch(model, 0.5)
    ids = torch.randint(0, 128256, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    common = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    whole = model.generate(ids, **common)
    chunked = model.generate(ids, prefill_chunk_size=chunk, **common)
    diff = float((whole.logits[0].float() - chunked.logits[0].float()).abs().max())
    row = {"test": "chunked_equals_one_shot", "L": length, "chunk": chunk, "layers": 2,
           "tokens_equal": bool(torch.equal(whole.sequences, chunked.sequences)), "max_first_logit_diff": diff,
           "logit_scale": float(whole.logits[0].float().abs().max()), "device": torch.cuda.get_device_name()}
    del model
    torch.cuda.empty_cache()
    return row


@torch.no_grad()
def size(length: int, chunk: int) -> list[dict]:
    model = build(32, length + 64)
    weights = torch.cuda.memory_allocated()
    ids = torch.randint(0, 128256, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    rows = []
    for fraction in (0.5, 0.0):
        patch(model, fraction)
        model.generate(ids[:, : 2 * chunk + 77], max_new_tokens=2, do_sample=False, prefill_chunk_size=chunk)  # compile
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=chunk,
                             return_dict_in_generate=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"test": "8b_chunked_prefill", "L": length, "chunk": chunk, "streaming_fraction": fraction,
                     "seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "weights_gib": weights / 2**30, "cache_gib": cache_of(out).nbytes() / 2**30,
                     "gpu_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
                     "device": torch.cuda.get_device_name()})
        print(rows[-1], flush=True)
        del out
        unpatch_model(model)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--chunk", type=int, default=8192)
    args = parser.parse_args()
    rows = [equality()]
    print(rows[0], flush=True)
    rows += size(args.length, args.chunk)
    info = meta(device=torch.cuda.get_device_name(), dtype="bfloat16",
                extra={"settings": {"sink": SETTINGS.sink_size, "local": SETTINGS.local_size},
                       "model": "Llama-3-8B shape, random weights"})
    write_results(RESULTS / "chunked_prefill_gpu", info, rows)


if __name__ == "__main__":
    main()
