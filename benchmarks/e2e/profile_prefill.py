"""Where a patched prefill spends its time, against stock: torch.profiler over one generate() prefill.

    python benchmarks/e2e/profile_prefill.py [--lengths 8192] [--configs stock patched_dense patched_streaming50]
    python benchmarks/e2e/profile_prefill.py --lengths 262144 --chunk 32768 --layers 4 \
        --configs patched_streaming50 patched_streaming50_fp8      # a chunked prefill: FP8 pages read back

Full-depth Llama-3-8B shape (random bf16 weights), batch 1, ``generate(max_new_tokens=1)`` as bench_e2e
times TTFT (``--chunk``: with ``prefill_chunk_size``, as bench_e2e's long part). Per configuration: the median
wall time of 3 warm calls, then one profiled call: GPU busy time
(sum of kernel times), and the top operators by GPU and by CPU time. Writes
benchmarks/results/profile_prefill.json (and the operator tables as text beside it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.e2e.bench_e2e import LSERVE, PATCHED, configure  # noqa: E402
from benchmarks.common.llama8b import build  # noqa: E402
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402



def prefill(model, ids, chunk=None):
    extra = {"prefill_chunk_size": chunk} if chunk else {}
    return model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--configs", nargs="+", default=["stock", "patched_dense", "patched_streaming50"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=None, help="prefill_chunk_size (default: one-shot)")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile_prefill")
    args = parser.parse_args()
    model = build(args.layers, max(args.lengths) + 64)
    scores = torch.rand(model.config.num_hidden_layers, model.config.num_key_value_heads,
                        generator=torch.Generator().manual_seed(0))
    rows, tables = [], []
    for config in args.configs:
        if config != "stock" and config not in PATCHED:
            raise SystemExit(f"unknown configuration {config!r}")
        configure(model, config, LSERVE, scores)
        for length in args.lengths:
            ids = torch.randint(3, model.config.vocab_size, (1, length), device="cuda",
                                generator=torch.Generator(device="cuda").manual_seed(length))
            prefill(model, ids, args.chunk)  # warm-up: compiles, plans
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                prefill(model, ids, args.chunk)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                prefill(model, ids, args.chunk)
                torch.cuda.synchronize()
            events = prof.key_averages()
            gpu_us = sum(e.self_device_time_total for e in events)
            launches = sum(e.count for e in events if e.self_device_time_total > 0)
            row = {"config": config, "L": length, "chunk": args.chunk, "wall_s": statistics.median(times), "gpu_busy_s": gpu_us / 1e6,
                   "ops_with_gpu_time": launches,
                   "top_gpu": [(e.key, round(e.self_device_time_total / 1e3, 2), e.count)
                               for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]]}
            print({k: v for k, v in row.items() if k != "top_gpu"}, flush=True)
            rows.append(row)
            tables.append(f"### {config} L={length} wall {row['wall_s']:.4f} s, GPU busy {row['gpu_busy_s']:.4f} s\n"
                          + events.table(sort_by="self_device_time_total", row_limit=25)
                          + events.table(sort_by="self_cpu_time_total", row_limit=25))
    info = meta(torch.cuda.get_device_name(), "bfloat16", {"layers": args.layers, "settings": LSERVE})
    path = write_results(args.out, info, rows)
    args.out.with_suffix(".txt").write_text("\n".join(tables))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
