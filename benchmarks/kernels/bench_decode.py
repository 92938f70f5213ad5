"""Decoding on a GPU: one layer's decode attention step and generate() tokens/s, against stock Transformers.

    python benchmarks/kernels/bench_decode.py [--lengths 32768 131072] [--layer-lengths 32768 131072 262144]

Llama-3-8B shape (32 query / 8 KV heads, head_dim 128, bf16, batch 1), random weights.
* Step (one layer, as the plugin runs it from Python: the registered attention function with a
  SparseCache, appending the new token, selecting pages every 4th step): ours with half the KV heads
  streaming (sink 128, decode window 256) and budget 4096, reuse 4, against SDPA decode over the full
  dense K/V. ``step_ms`` is the median of 4-step cycles / 4; ``selection_ms`` times one selection alone.
  ``kernel_ms``/``sdpa_kernel_ms``/``selection_kernel_ms``: the same GPU work replayed from a CUDA graph
  (no Python launch overhead): what the kernels cost by themselves. ``shortlist{1,4}_{select,reuse}_kernel_ms``:
  page selection alone from a CUDA graph, by the bound (1) and in two stages (4, the default), on a selecting
  step and on a step that reuses the selection (``--lengths 0``: the layer step only).
* generate(): decode tokens/s (timestamps of the steps, the prefill excluded) for the patched model,
  for stock Transformers (sdpa + DynamicCache) and for our cache and kernels with every head dense and
  a budget covering the context (no selection); ROUNDS alternating rounds, the median (the upper
  one of two); KV-cache bytes of each.
Writes benchmarks/results/decode.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from sparse_attn_hf import Profile, SparseCache, SparseConfig, ops, patch_model, unpatch_model
from sparse_attn_hf.attention import sparse_attention_forward
from sparse_attn_hf.cache import PendingKV
from sparse_attn_hf.compat import CACHE_ARG, cache_of
from sparse_attn_hf.kernels.layout import STEP_RESELECT, LogitTerms, Visibility
from sparse_attn_hf.methods.decode_step import DecodePlan
from sparse_attn_hf.methods.page_selection import PageSettings, select_pages

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common.llama8b import build  # noqa: E402
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SPARSE = dict(streaming_fraction=0.5, sink_size=128, local_size=4096, decode_local_size=256, token_budget=4096,
              reuse_interval=4)
NEW_TOKENS = 48
ROUNDS = 2


def patch(model, **settings):
    scores = torch.rand(model.config.num_hidden_layers, KV_HEADS, generator=torch.Generator().manual_seed(1))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(**settings))


def fill(model, cache: SparseCache, length: int) -> None:
    """Put ``length`` random tokens into every layer of ``cache`` (chunks of 8K), then one decode step."""
    zero = torch.zeros(1, dtype=torch.long, device="cuda")
    for layer in cache.layers:
        for first in range(0, length, 8192):
            n = min(8192, length - first)
            k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            layer.update(k, k)
            layer.append(k, torch.randn_like(k), zero)
            DecodePlan.of(layer).reset(layer)  # as the attention does after storing a prompt: the counters restart


@torch.no_grad()
def layer_step(model, length: int) -> dict:
    module = model.model.layers[0].self_attn
    cache = SparseCache(model, max_cache_len=length + 65536)  # no growth while timing
    fill(model, cache, length)
    decoding = cache.decoding()  # one-token forwards on this cache are decode steps from here on
    decoding.__enter__()
    layer = cache.layers[0]
    q = torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    def cycle():
        for _ in range(4):
            pending = PendingKV(layer, k, k)
            sparse_attention_forward(module, q, pending, pending, None, scaling=HEAD_DIM**-0.5)

    step_ms = triton.testing.do_bench(cycle, warmup=50, rep=300, return_mode="median") / 4
    dense_k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    dense_v = torch.randn_like(dense_k)
    sdpa_ms = triton.testing.do_bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, dense_k, dense_v, enable_gqa=True),
        warmup=50, rep=300, return_mode="median")
    t = layer._tensors
    zero = torch.zeros(1, dtype=torch.long, device="cuda")
    grouped = q.view(1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM).index_select(1, layer.dense_idx)

    reselecting = layer.step.clone()
    reselecting[STEP_RESELECT] = 1  # time a selection, not a reuse
    reusing = layer.step.clone()
    reusing[STEP_RESELECT] = 0
    scores = torch.empty(1, len(layer.dense_heads), layer.capacity // 64, device="cuda")
    selected = torch.full((1, len(layer.dense_heads), 4096 // 64 - 1), -1, dtype=torch.int32, device="cuda")
    listed = torch.full((1, len(layer.dense_heads), 4 * selected.shape[2]), -1, dtype=torch.int32, device="cuda")

    store = dict(key_min=t["key_min"], key_max=t["key_max"], scores=scores, selected=selected, listed=listed,
                 keys=t["dense_key"])
    terms = LogitTerms(HEAD_DIM**-0.5)

    def select(shortlist=1, step=reselecting):
        return select_pages(grouped, store, step, Visibility(zero), terms,
                            PageSettings(budget=4096, page_size=64, logical_page_size=16, shortlist=shortlist))

    selection_ms = triton.testing.do_bench(select, warmup=50, rep=300, return_mode="median")
    # GPU time alone (CUDA-graph replay, no Python launch overhead): our append + decode kernels of one
    # step with a fixed selection, SDPA decode, and one selection
    step = layer.append_decode(k, k, zero)
    step.pages = t["pages"]
    visible = Visibility(zero, sink=layer.sink_size, local=layer.decode_local_size)

    def kernels():
        ops.append_token(k, k, t, seen=layer.step[:1], kv_start=zero, head_kind=layer.head_kind,
                         head_slot=layer.head_slot, sink=layer.sink_size, logical_page_size=16)
        ops.paged_decode(q[:, :, 0], step, visible, terms)

    kernel_ms = triton.testing.do_bench_cudagraph(kernels, rep=100, return_mode="median")
    sdpa_kernel_ms = triton.testing.do_bench_cudagraph(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, dense_k, dense_v, enable_gqa=True),
        rep=100, return_mode="median")
    # page selection by the bound alone (shortlist 1) and in two stages (4, the default), on a selecting step and
    # on a step that reuses the selection (the graph replays the same launches; the kernels return at once)
    selection_variants = {
        f"shortlist{n}_{kind}_kernel_ms": triton.testing.do_bench_cudagraph(
            lambda n=n, step=step: select(n, step), rep=100, return_mode="median")
        for n in (1, 4) for kind, step in (("select", reselecting), ("reuse", reusing))}
    selection_kernel_ms = selection_variants["shortlist1_select_kernel_ms"]  # one selection, as the table has it
    decoding.__exit__(None, None, None)
    del cache, dense_k, dense_v
    torch.cuda.empty_cache()
    return {"L": length, "kind": "layer_step", "step_ms": step_ms, "sdpa_step_ms": sdpa_ms,
            "selection_ms": selection_ms, "speedup": sdpa_ms / step_ms, "kernel_ms": kernel_ms,
            "sdpa_kernel_ms": sdpa_kernel_ms, "selection_kernel_ms": selection_kernel_ms,
            "kernel_speedup": sdpa_kernel_ms / kernel_ms, **selection_variants,
            "device": torch.cuda.get_device_name()}


class StepClock(LogitsProcessor):
    """Records a synchronized timestamp at every generation step (called once per forward)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def decode_speed(model, ids, cache=None, **kwargs) -> tuple[float, object]:
    clock = StepClock()
    out = model.generate(ids, max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, do_sample=False,
                         logits_processor=LogitsProcessorList([clock]), **{CACHE_ARG: cache},
                         return_dict_in_generate=True, **kwargs)
    steps = len(clock.times) - 1  # the first timestamp follows the prefill
    return steps / (clock.times[-1] - clock.times[0]), cache_of(out)


def cache_bytes(cache) -> int:
    if isinstance(cache, SparseCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def end_to_end(model, length: int) -> dict:
    ids = torch.randint(0, 128256, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(length))
    row = {"L": length, "kind": "generate", "new_tokens": NEW_TOKENS, "rounds": ROUNDS,
           "device": torch.cuda.get_device_name()}
    speeds = {"stock_": [], "": [], "own_dense_": []}
    for _ in range(ROUNDS):  # the three set-ups alternate: drift of the machine hits all of them
        tps, cache = decode_speed(model, ids, cache=DynamicCache(config=model.config))
        speeds["stock_"].append(tps)
        row["stock_kv_bytes"] = cache_bytes(cache)
        del cache
        torch.cuda.empty_cache()
        for name, settings in (("", SPARSE), ("own_dense_", dict(streaming_fraction=0.0, token_budget=length + 4096))):
            patch(model, **settings)
            decode_speed(model, ids[:, :4096], prefill_chunk_size=8192)  # compile the kernels first
            tps, cache = decode_speed(model, ids, prefill_chunk_size=8192)
            speeds[name].append(tps)
            row[f"{name}kv_bytes"] = cache_bytes(cache)
            unpatch_model(model)
            del cache
            torch.cuda.empty_cache()
    for name, values in speeds.items():
        row[f"{name}tokens_per_s"] = sorted(values)[len(values) // 2]  # median (upper for 2 rounds)
        row[f"{name}tokens_per_s_all"] = values
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--layer-lengths", type=int, nargs="+", default=[32768, 131072, 262144])
    parser.add_argument("--out", type=Path, default=RESULTS / "decode")
    args = parser.parse_args()
    args.lengths = [n for n in args.lengths if n > 0]  # --lengths 0: the layer step only
    rows = []
    small = build(1, max(args.layer_lengths) + 8192)
    patch(small, **SPARSE)
    for length in args.layer_lengths:
        rows.append(layer_step(small, length))
        print(json.dumps(rows[-1]), flush=True)
    del small
    torch.cuda.empty_cache()
    if not args.lengths:
        save(args, rows)
        return
    model = build(32, max(args.lengths) + 8192)
    for length in args.lengths:
        rows.append(end_to_end(model, length))
        save(args, rows)
    save(args, rows)


def save(args, rows) -> None:
    info = meta(device=torch.cuda.get_device_name(), dtype="bfloat16", extra={
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "batch": 1}, "settings": SPARSE,
        "timing": "layer step: triton.testing.do_bench median of 4-step cycles / 4; generate: synchronized "
                  f"timestamps of {NEW_TOKENS} decode steps after the prefill",
    })
    write_results(args.out, info, rows)
    plot(args.out.with_suffix(".png"), rows)


def plot(path: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = [r for r in rows if r["kind"] == "layer_step"]
    if steps:
        lengths = [r["L"] for r in steps]
        left.plot(lengths, [r["sdpa_step_ms"] for r in steps], marker="o", label="SDPA, dense")
        left.plot(lengths, [r["step_ms"] for r in steps], marker="o", label="ours, step")
        left.plot(lengths, [r["selection_ms"] for r in steps], marker="x", linestyle="--", label="ours, one selection")
        left.set_xscale("log", base=2)
        left.set_xlabel("context length")
        left.set_ylabel("ms per layer")
        left.set_title("decode attention, one layer")
        left.legend(fontsize=8)
    gens = [r for r in rows if r["kind"] == "generate"]
    if gens:
        x = range(len(gens))
        for i, (key, label) in enumerate((("stock_tokens_per_s", "stock (sdpa + DynamicCache)"),
                                          ("own_dense_tokens_per_s", "ours, all dense"),
                                          ("tokens_per_s", "ours, sparse"))):
            right.bar([v + 0.27 * (i - 1) for v in x], [r[key] for r in gens], width=0.27, label=label)
        right.set_xticks(list(x), [f"{r['L'] // 1024}K" for r in gens])
        right.set_ylabel("decode tokens / s")
        right.set_title("generate(), Llama-3-8B shape")
        right.legend(fontsize=8)
    fig.suptitle(rows[0]["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
