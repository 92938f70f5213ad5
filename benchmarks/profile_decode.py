"""Where a decode step's time goes: torch.profiler over a few generate() steps, stock and patched.

    python benchmarks/profile_decode.py [--length 32768] [--layers 4]

Prints the operators by self CPU time and by GPU time (Llama-3-8B layer shape, random bf16 weights),
and the cost of one trivial eager op on this machine (CPU launch overhead).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.common
from benchmarks.kernels.bench_decode import SPARSE, patch  # noqa: E402
from benchmarks.common.llama8b import build  # noqa: E402

from sparse_attn_hf import SparseCache, unpatch_model  # noqa: E402
from sparse_attn_hf.compat import CACHE_ARG, cache_of  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    x = torch.zeros(16, device="cuda")
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(1000):
        x.add_(1)
    torch.cuda.synchronize()
    print(f"one eager add_: {(time.perf_counter() - start) * 1e3:.1f} us (CPU launch overhead)")
    model = build(args.layers, args.length + 4096)
    ids = torch.randint(0, 128256, (1, args.length), device="cuda")
    for name in ("stock", "patched"):
        if name == "patched":
            patch(model, **SPARSE)
        cache = DynamicCache(config=model.config) if name == "stock" else None
        out = model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False, **{CACHE_ARG: cache},
                             return_dict_in_generate=True)
        cache = cache_of(out)
        nxt = out.sequences[:, -1:]
        decoding = cache.decoding() if isinstance(cache, SparseCache) else contextlib.nullcontext()
        decoding.__enter__()  # a manual loop on a SparseCache marks its decode steps
        for _ in range(3):  # warm
            nxt = model(nxt, **{CACHE_ARG: cache}).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(8):
                nxt = model(nxt, **{CACHE_ARG: cache}).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / 8
        decoding.__exit__(None, None, None)
        print(f"\n=== {name}: {wall * 1e3:.2f} ms per forward of {args.layers} layers at {args.length} tokens "
              f"(profiled) ===")
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=25))
        print(table.table(sort_by="cuda_time_total", row_limit=12))
        if name == "patched":
            unpatch_model(model)
        del cache, out


if __name__ == "__main__":
    main()
