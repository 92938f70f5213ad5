"""Serving through Transformers' continuous batching on one GPU (issue 33): the manager with the package's attention
against the manager with its own (``sdpa`` over the packed requests), a full-depth Llama-3-8B shape, random weights.

    python benchmarks/e2e/bench_serving.py --requests 16 --length 32768 --new-tokens 256     # together, staggered
    python benchmarks/e2e/bench_serving.py --requests 4 --length 131072 --arrivals together
    python benchmarks/e2e/bench_serving.py --dry-run        # the bookkeeping on a tiny model, on the CPU

Per configuration and arrival pattern, one ``ContinuousBatchingManager`` (started, fed, stopped): ``together`` submits
every request at once, ``staggered`` one every ``--gap`` seconds, after a first small manager of the configuration
(its one-time costs apart). Figures: total generated tokens per second (from the first submission to the last
token), each request's time to first token (from its submission to its first token's timestamp: mean and p95), peak
allocated memory, and allocated memory after the manager stops against before it started. ``--check N``: the first N
requests' tokens against the patched model's own ``generate()`` of the same prompt (greedy): ``same_prefix``, each
one's first tokens that agree, ``same_as_generate``, how many agree throughout. ``--profile``: the manager's loop
under torch.profiler, operator tables beside the results. Configurations: ``stock`` (Transformers' manager as
shipped) and ``patched`` (``patch_model`` with 50% streaming heads, LServe's settings: the package's attention
serves the manager, ``sparse_attn_hf.batching.ON_GPU``, on by default).
Writes benchmarks/results/serving.json (rows of other shapes kept) with a PNG beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta  # noqa: E402
from benchmarks.e2e.bench_e2e import LSERVE  # noqa: E402

from sparse_attn_hf import Profile, SparseConfig, patch_model, unpatch_model  # noqa: E402
from sparse_attn_hf import batching  # noqa: E402

GIB = 2**30


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def serve(model, inputs: list[list[int]], new_tokens: int, gap: float, cuda: bool, profiles: list | None = None,
          graphs: bool = False) -> dict:
    """One manager: submit ``inputs`` (one every ``gap`` seconds, or all at once), wait for every result, stop.
    ``profiles``: run the manager's loop under torch.profiler (in its own thread, where the work is) and append it.
    ``graphs``: the manager's decode steps replayed from CUDA graphs (its default off for an attention with masks)."""
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else None
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=ContinuousBatchingConfig(
        use_cuda_graph=(False, True) if graphs else None))
    fast_steps = []  # the package's decode fast-path calls (layers x steps), counted for the record
    from sparse_attn_hf import attention

    step = attention.block_table_decode_step
    attention.block_table_decode_step = lambda *args: fast_steps.append(1) or step(*args)
    if profiles is not None:
        loop = manager._run_generation_loop
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

        def profiled(**kwargs):
            with torch.profiler.profile(activities=activities) as prof:
                loop(**kwargs)
            profiles.append(prof)

        manager._run_generation_loop = profiled
    manager.start()
    submitted: dict[str, float] = {}

    def feed():
        for i, ids in enumerate(inputs):
            if gap and i:
                time.sleep(gap)
            submitted[f"r{i}"] = time.perf_counter()
            manager.add_request(ids, request_id=f"r{i}", max_new_tokens=new_tokens, record_timestamps=True)

    start = time.perf_counter()
    feeder = threading.Thread(target=feed)
    feeder.start()
    results = {}
    while len(results) < len(inputs):
        out = manager.get_result(timeout=600)
        if out is None:
            raise RuntimeError(f"the manager stopped with {len(results)} of {len(inputs)} requests answered")
        if out.error:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        results[out.request_id] = out
    feeder.join()
    processor = manager.batch_processor  # the planned cache: how many tokens it holds, every request together
    cache_tokens = processor.cache.max_tokens_read if processor is not None else None
    del processor  # not held while the memory after stop is read
    manager.stop(block=True)
    attention.block_table_decode_step = step
    pages = getattr(getattr(model, "_sparse_attn_state", None), "batched_pages", None)  # this manager's selections
    end = max(r.timestamps[-1] for r in results.values())
    gc.collect()
    row = {"seconds": end - start, "tokens": sum(len(r.generated_tokens) for r in results.values()),
           "fast_path_layer_calls": len(fast_steps), "cache_tokens": cache_tokens,
           "requests_that_fit": cache_tokens // (len(inputs[0]) + new_tokens) if cache_tokens else None,
           "max_blocks_per_request": manager.continuous_batching_config.max_blocks_per_request,
           "page_selections": pages.selected if pages is not None else 0}
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    ttft = sorted(r.timestamps[0] - submitted[key] for key, r in results.items())
    row.update(ttft_mean_s=statistics.mean(ttft), ttft_p95_s=ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
               ttft_max_s=ttft[-1])
    if cuda:
        torch.cuda.synchronize()
        row.update(peak_gib=torch.cuda.max_memory_allocated() / GIB,
                   after_stop_gib=(torch.cuda.memory_allocated() - before) / GIB)
    row["tokens_of"] = {key: results[key].generated_tokens for key in sorted(results)}
    return row


def configure(model, config: str, settings: dict) -> None:
    if getattr(model, "_sparse_attn_state", None) is not None:
        unpatch_model(model)
    batching.ON_GPU = True  # the default; a stock row unpatches the model instead
    if config.startswith("patched"):
        scores = torch.rand(model.config.num_hidden_layers, model.config.num_key_value_heads,
                            generator=torch.Generator().manual_seed(0))
        patch_model(model, Profile.from_scores(model, scores), SparseConfig(streaming_fraction=0.5, **settings))


def check(model, inputs, rows_tokens: dict, count: int, new_tokens: int) -> list[int]:
    """For each of the first ``count`` requests, how many of its first tokens equal the patched generate()'s greedy
    ones (all of them on a CPU in float32; in bfloat16 on a GPU the kernels differ in rounding from generate()'s and
    a near-tie may go the other way, after which the continuations differ)."""
    prefixes = []
    for i, ids in enumerate(inputs[:count]):
        x = torch.tensor([ids], device=model.device)
        out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, x.shape[1]:].tolist()
        got = rows_tokens[f"r{i}"]
        prefixes.append(next((j for j, (a, b) in enumerate(zip(out, got)) if a != b), min(len(out), len(got))))
    return prefixes


def plot(path: Path, rows: list[dict], info: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = sorted({(r["requests"], r["L"], r["arrival"]) for r in rows if r["status"] == "ok"})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, config in enumerate(("stock", "patched")):
        tps = [next((r["tokens_per_s"] for r in rows if (r["requests"], r["L"], r["arrival"]) == s
                     and r["config"] == config and r["status"] == "ok"), 0) for s in shapes]
        ttft = [next((r["ttft_mean_s"] for r in rows if (r["requests"], r["L"], r["arrival"]) == s
                      and r["config"] == config and r["status"] == "ok"), 0) for s in shapes]
        x = [j + 0.4 * i for j in range(len(shapes))]
        axes[0].bar(x, tps, width=0.4, label=config)
        axes[1].bar(x, ttft, width=0.4, label=config)
    labels = [f"{n} x {length // 1024}K\n{arrival}" for n, length, arrival in shapes]
    for ax, title in zip(axes, ("generated tokens per second", "mean time to first token, s")):
        ax.set_xticks([j + 0.2 for j in range(len(shapes))], labels, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"continuous batching, {info['model']}, {info['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--arrivals", type=lambda s: s.split(","), default=["together", "staggered"])
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between staggered submissions")
    parser.add_argument("--configs", type=lambda s: s.split(","), default=["stock", "patched"])
    parser.add_argument("--check", type=int, default=2, help="requests compared with the patched generate()")
    parser.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    parser.add_argument("--profile", action="store_true",
                        help="each measured manager under torch.profiler: operator tables beside --out (.txt)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU: the bookkeeping only")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = parser.parse_args(argv)
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_serving.py measures a GPU; use --dry-run on a CPU.")
    if args.dry_run:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        args.requests, args.length, args.new_tokens, args.gap = 3, 96, 6, 0.05
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, max_position_embeddings=1024)).eval()
        settings = dict(sink_size=4, local_size=32, decode_local_size=8, page_size=16, logical_page_size=4,
                        token_budget=48, reuse_interval=4, page_selection="always")  # selecting on the CPU too
        label = "tiny Llama (2 layers), random weights"
    else:
        from benchmarks.common.llama8b import build

        model = build(32, args.length + args.new_tokens + 64)
        settings, label = LSERVE, "Llama-3-8B shape (benchmarks/common/llama8b.py), random weights"
    inputs = prompts(args.requests, args.length, model.config.vocab_size)
    info = meta(device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(model.dtype).replace("torch.", ""),
                extra={"model": label, "new_tokens": args.new_tokens, "gap_s": args.gap, "settings": settings,
                       "patched": "streaming_fraction 0.5 (Profile.from_scores, seeded)"})
    rows, tables = [], []
    started = time.perf_counter()
    spent = lambda: args.budget_s is not None and time.perf_counter() - started > args.budget_s  # noqa: E731
    for config in args.configs:
        if spent():  # no row of this configuration can start: no patching, no first manager
            rows += [{"config": config, "requests": args.requests, "L": args.length, "arrival": arrival,
                      "status": "not_run", "reason": f"time budget of the run ({args.budget_s:.0f} s) spent"}
                     for arrival in args.arrivals]
            write(args.out, info, rows)
            continue
        configure(model, config, settings)
        graphs = config.endswith("_graphs")
        serve(model, [ids[:1024] for ids in inputs[:2]], 4, 0.0, cuda, graphs=graphs)  # a first manager: one-time costs
        for arrival in args.arrivals:
            row = {"config": config, "requests": args.requests, "L": args.length, "arrival": arrival, "status": "ok",
                   "attention": None}
            if spent():
                rows.append(dict(row, status="not_run", reason=f"time budget of the run ({args.budget_s:.0f} s) spent"))
                write(args.out, info, rows)
                continue
            try:
                gap = args.gap if arrival == "staggered" else 0.0
                if args.profile:
                    profiles = []
                    row.update(serve(model, inputs, args.new_tokens, gap, cuda, profiles, graphs=graphs))
                    events = profiles[0].key_averages()
                    row.update(gpu_busy_s=sum(e.self_device_time_total for e in events) / 1e6,
                               ops_with_gpu_time=sum(e.count for e in events if e.self_device_time_total > 0))
                    tables.append(f"### {config}, {arrival}: {row['seconds']:.2f} s\n"
                                  + events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                                 row_limit=30)
                                  + events.table(sort_by="self_cpu_time_total", row_limit=30))
                    args.out.with_suffix(".txt").write_text("\n".join(tables))
                else:
                    row.update(serve(model, inputs, args.new_tokens, gap, cuda, graphs=graphs))
                row["attention"] = model.config._attn_implementation
                if config.startswith("patched") and args.check:
                    row["same_prefix"] = check(model, inputs, row["tokens_of"], args.check, args.new_tokens)
                    row["same_as_generate"] = sum(n == args.new_tokens for n in row["same_prefix"])
            except torch.OutOfMemoryError as error:
                row.update(status="oom", error=str(error).splitlines()[0][:200])
            row.pop("tokens_of", None)
            rows.append(row)
            ratios(rows)
            write(args.out, info, rows)  # after every row: a run stopped by a time limit keeps what finished
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
    if getattr(model, "_sparse_attn_state", None) is not None:
        unpatch_model(model)
    print("wrote", args.out)


def ratios(rows: list[dict]) -> None:
    """Each patched row against stock's of the same arrival pattern in this run."""
    for row in rows:
        base = next((r for r in rows if r["config"] == "stock" and r["arrival"] == row["arrival"]
                     and r["status"] == "ok"), None)
        if row["config"] != "stock" and base and row["status"] == "ok":
            row.update(tokens_per_s_x_stock=row["tokens_per_s"] / base["tokens_per_s"],
                       ttft_mean_x_stock=row["ttft_mean_s"] / base["ttft_mean_s"],
                       ttft_p95_x_stock=row["ttft_p95_s"] / base["ttft_p95_s"])


def write(path: Path, info: dict, rows: list[dict]) -> None:
    """Merge into ``path``: rows of the same (configuration, requests, length, arrival) are replaced."""
    key = lambda r: (r["config"], r["requests"], r["L"], r["arrival"])  # noqa: E731
    old = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    run_id = f"{info['date']} {info['commit'][:10]}"
    runs = {**old["meta"].get("runs", {}), run_id: {k: v for k, v in info.items() if k != "runs"}}
    kept = {key(r) for r in old["rows"]}
    rows = [r for r in rows if r["status"] != "not_run" or key(r) not in kept]  # a skipped row keeps a measured one
    new = {key(r) for r in rows}
    merged = [r for r in old["rows"] if key(r) not in new] + [dict(r, run=run_id) for r in rows]
    runs = {k: v for k, v in runs.items() if any(r.get("run") == k for r in merged)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {**info, "runs": runs}, "rows": merged}, indent=1) + "\n")
    plot(path, merged, info)


if __name__ == "__main__":
    main()
