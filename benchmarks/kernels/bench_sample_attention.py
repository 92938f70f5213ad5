"""SampleAttention prefill on a GPU: selection cost, sparse attention time and chosen density vs SDPA.

    python benchmarks/kernels/bench_sample_attention.py [--lengths 32768 131072] [--crossover 4096 8192 16384 32768]
    python benchmarks/kernels/bench_sample_attention.py --costs [--lengths 32768 131072]  # selection cost, block/gather

Llama-3-8B attention shape (32 query / 8 KV heads, head_dim 128, bf16, batch 1). Random Q/K have no
structure, so the inputs come from a documented synthetic generator (``synthetic``):
* locality: a shared positional code on 16 of the 128 dims, ``c(t) = [cos(w_f t), sin(w_f t)]`` for 8
  low frequencies, added to every query and key (``q_i . k_j`` gains ``sum_f cos(w_f (i - j))``, largest
  near the diagonal, as RoPE's low frequencies give);
* sinks: the first 4 keys carry a large component along the mean query direction;
* stripes: 64 random key columns per KV head carry smaller components along it (Zipf strengths);
* noise: N(0, 1) on every dim.
Rows (one per case and length): ``ms`` = the whole prefill attention of the layer (selection included),
``selection_ms`` = stages 1-2 alone (r_row 0.05), ``sdpa_ms`` = SDPA dense, ``dense_ms`` = our dense
kernel, ``density`` = computed share of the causal matrix, ``alpha``. Cases: SampleAttention on every
head at alpha 0.95 and 0.8 (the density it chose), pinned densities 0.1 / 0.2 / 0.4 (window + random
stripes, no selection), and half the heads streaming (sink 128, local 4096) with SampleAttention
pinned at 0.2 on the rest. ``--crossover`` times SampleAttention (alpha 0.95, selection included)
against our dense kernel at shorter lengths: the shortest length where it wins is the profile's
``dense_below``. Writes benchmarks/results/sample_attention.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

from sparse_attn_hf import ops
from sparse_attn_hf.kernels.prefill import sparse_attention_triton
from sparse_attn_hf.methods.sample_attention import SampleSettings, sample_attention_mask, sample_rows, window_size
from sparse_attn_hf.ops import LogitTerms, Visibility
from sparse_attn_hf.stripe_mask import StripeMask

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

HEADS, KV_HEADS, DIM, RW, R_ROW, SINK, LOCAL = 32, 8, 128, 0.08, 0.05, 128, 4096
SCALE = DIM**-0.5
TERMS = LogitTerms(SCALE)


def synthetic(length: int, seed: int = 0):
    """(q [1, 32, L, 128], k, v [1, 8, L, 128]) in bf16 with sinks, stripes and locality (see above)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HEADS, length, DIM, device="cuda", generator=gen)
    k = torch.randn(1, KV_HEADS, length, DIM, device="cuda", generator=gen)
    v = torch.randn(1, KV_HEADS, length, DIM, device="cuda", generator=gen)
    t = torch.arange(length, device="cuda", dtype=torch.float32)[:, None]
    freqs = 1.0 / (64.0 * 4.0 ** torch.arange(8, device="cuda"))  # periods from 400 to 100K tokens
    code = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)], dim=-1) * 1.2  # [L, 16]
    q[..., :16] += code
    k[..., :16] += code
    direction = q.view(1, KV_HEADS, HEADS // KV_HEADS, length, DIM).mean(dim=(2, 3))  # per KV head
    direction = direction / direction.norm(dim=-1, keepdim=True)
    k[:, :, :4] += 6.0 * direction[:, :, None]
    for h in range(KV_HEADS):
        cols = torch.randperm(length, device="cuda", generator=gen)[:64]
        strength = 4.0 / torch.arange(1, 65, device="cuda").float() ** 0.5
        k[0, h, cols] += strength[:, None] * direction[0, h]
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def timed(fn, rep: float) -> float:
    return triton.testing.do_bench(fn, warmup=max(25, rep / 4), rep=rep, return_mode="median")


def pinned_mask(length: int, heads: int, density: float, seed: int = 0) -> StripeMask:
    """Window of rw x L plus random stripes, as many as give ``density`` (bisection on the count)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    window = torch.full((1, heads), window_size(RW, length), dtype=torch.long, device="cuda")
    order = torch.stack([torch.randperm(length, device="cuda", generator=gen) for _ in range(heads)])[None]

    def mask(count: int) -> StripeMask:
        cols = torch.sort(order[..., :max(count, 1)], dim=-1).values.to(torch.int32)
        counts = torch.full((1, heads), count, dtype=torch.int32, device="cuda")
        if count == 0:
            cols = torch.full_like(cols, length)
        return StripeMask(window=window, stripes=cols, counts=counts, q_len=length, k_len=length,
                          kv_start=torch.zeros(1, dtype=torch.long, device="cuda"))

    low, high = 0, length
    while low < high:
        mid = (low + high) // 2
        if mask(mid).density() < density:
            low = mid + 1
        else:
            high = mid
    return mask(low)


def run_length(length: int) -> list[dict]:
    q, k, v = synthetic(length)
    zero = torch.zeros(1, dtype=torch.long, device="cuda")
    none = torch.zeros(KV_HEADS, dtype=torch.bool, device="cuda")
    rep = 200 if length <= 32768 else 1000
    sdpa_ms = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), rep)
    visible = Visibility(zero, streaming=none, sink=0, local=1, q_first=0, k_pos=None)
    dense_ms = timed(lambda: sparse_attention_triton(q, k, v, visible, TERMS), rep)
    rows = []
    base = {"L": length, "sdpa_ms": sdpa_ms, "dense_ms": dense_ms, "device": torch.cuda.get_device_name()}

    def select(alpha, qq=q, kk=k):
        return sample_attention_mask(qq, kk, Visibility(zero, q_first=0), TERMS, SampleSettings(alpha, RW, R_ROW))

    for alpha in (0.95, 0.8):
        mask = select(alpha)
        selection_ms = timed(lambda: select(alpha), rep)
        ms = timed(lambda: ops.stripe_attention(q, k, v, select(alpha), TERMS), rep)
        rows.append({**base, "case": f"sample_alpha_{alpha}", "alpha": alpha, "ms": ms, "selection_ms": selection_ms,
                     "density": mask.density(), "stripes_mean": float(mask.counts.float().mean())})
        print(json.dumps(rows[-1]), flush=True)
    for density in (0.1, 0.2, 0.4):
        mask = pinned_mask(length, KV_HEADS, density)
        ms = timed(lambda: ops.stripe_attention(q, k, v, mask, TERMS), rep)
        rows.append({**base, "case": f"pinned_{density}", "alpha": None, "ms": ms, "selection_ms": 0.0,
                     "density": mask.density()})
        print(json.dumps(rows[-1]), flush=True)
    # half the KV heads streaming, SampleAttention pinned at 0.2 on the other half (two launches, as the plugin)
    half = KV_HEADS // 2
    groups = HEADS // KV_HEADS
    q_s, q_d = q[:, : half * groups], q[:, half * groups :]
    k_s, k_d, v_s, v_d = k[:, :half], k[:, half:], v[:, :half], v[:, half:]
    mask = pinned_mask(length, half, 0.2, seed=1)
    stream = torch.ones(half, dtype=torch.bool, device="cuda")
    rows_sel = timed(lambda: sample_attention_mask(q_d, k_d, Visibility(zero, q_first=0), TERMS,
                                                   SampleSettings(0.95, RW, R_ROW)), rep)
    streaming = Visibility(zero, streaming=stream, sink=SINK, local=LOCAL, q_first=0, k_pos=None)

    def combined():
        sparse_attention_triton(q_s, k_s, v_s, streaming, TERMS)
        ops.stripe_attention(q_d, k_d, v_d, mask, TERMS)

    ms = timed(combined, rep) + rows_sel  # the selection a real call makes on the dense half
    pos = torch.arange(length, dtype=torch.float64)
    per_row = torch.clamp(pos + 1, max=LOCAL) + torch.clamp(torch.clamp(pos + 1 - LOCAL, min=0), max=SINK)
    stream_density = float(per_row.sum()) / (length * (length + 1) / 2)
    rows.append({**base, "case": "streaming50_sample0.2", "alpha": None, "ms": ms, "selection_ms": rows_sel,
                 "density": 0.5 * stream_density + 0.5 * mask.density()})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def crossover(lengths: list[int]) -> list[dict]:
    rows = []
    for length in lengths:
        q, k, v = synthetic(length, seed=2)
        zero = torch.zeros(1, dtype=torch.long, device="cuda")
        none = torch.zeros(KV_HEADS, dtype=torch.bool, device="cuda")
        visible = Visibility(zero, streaming=none, sink=0, local=1, q_first=0, k_pos=None)
        dense = timed(lambda: sparse_attention_triton(q, k, v, visible, TERMS), 200)

        def sample():
            mask = sample_attention_mask(q, k, Visibility(zero, q_first=0), TERMS, SampleSettings(0.95, RW, R_ROW))
            return ops.stripe_attention(q, k, v, mask, TERMS)

        rows.append({"L": length, "case": "crossover", "dense_ms": dense, "ms": timed(sample, 200),
                     "device": torch.cuda.get_device_name()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tune(length: int) -> None:
    """Stage 1 alone (both sampling passes) for kernel configurations; printed, not saved."""
    from sparse_attn_hf.kernels.sampling import sampled_column_scores_triton

    q, k, _ = synthetic(length)
    zero = torch.zeros(1, dtype=torch.long, device="cuda")
    rows = sample_rows(length, R_ROW, device="cuda")
    window = torch.full((1, KV_HEADS), window_size(RW, length), dtype=torch.long, device="cuda")
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q[:, ::4], q[:, ::4], is_causal=True,
                                                                          enable_gqa=True), 500)
    for block_n in (64, 128):
        for packed in (64, 128):
            for warps in (4, 8):
                try:
                    ms = timed(lambda: sampled_column_scores_triton(
                        q, k, Visibility(zero, q_first=0), TERMS, rows=rows, window=window, block_n=block_n,
                        packed_rows=packed, num_warps=warps), 500)
                except Exception as error:  # out of resources
                    print(f"config {block_n} {packed} {warps}: {type(error).__name__}", flush=True)
                    continue
                print(json.dumps({"L": length, "block_n": block_n, "packed_rows": packed, "num_warps": warps,
                                  "stage1_ms": ms, "sdpa_ms": sdpa, "share": ms / sdpa}), flush=True)


def clustered_mask(length: int, heads: int, per_block: int, blocks: int, seed: int = 0) -> StripeMask:
    """Window of rw x L plus ``blocks`` random key blocks of 128 per head, each holding ``per_block``
    random stripe columns (stripes that come in clusters, as block-or-gather expects)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    window = torch.full((1, heads), window_size(RW, length), dtype=torch.long, device="cuda")
    rows = []
    for _ in range(heads):
        chosen = torch.randperm(length // 128 - 1, device="cuda", generator=gen)[:blocks]
        within = torch.stack([torch.randperm(128, device="cuda", generator=gen)[:per_block] for _ in chosen])
        rows.append(torch.sort((chosen[:, None] * 128 + within).flatten()).values)
    cols = torch.stack(rows)[None].to(torch.int32)
    counts = torch.full((1, heads), cols.shape[-1], dtype=torch.int32, device="cuda")
    return StripeMask(window=window, stripes=cols, counts=counts, q_len=length, k_len=length,
                      kv_start=torch.zeros(1, dtype=torch.long, device="cuda"))


def costs(lengths: list[int]) -> list[dict]:
    """Selection (stages 1 and 2) at r_row 0.05 and 0.025 against SDPA on the same heads, and block-or-gather:
    stripes clustered in key blocks, gathered column by column against blocks visited whole."""
    rows = []
    for length in lengths:
        q, k, v = synthetic(length)
        zero = torch.zeros(1, dtype=torch.long, device="cuda")
        none = torch.zeros(KV_HEADS, dtype=torch.bool, device="cuda")
        sdpa_ms = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True), 1000)
        base = {"L": length, "sdpa_ms": sdpa_ms, "device": torch.cuda.get_device_name()}
        for r_row in (0.05, 0.025):
            def select():
                return sample_attention_mask(q, k, Visibility(zero, q_first=0), TERMS,
                                             SampleSettings(0.95, RW, r_row))
            sampled = sample_rows(length, r_row, device="cuda")
            window = torch.full((1, KV_HEADS), window_size(RW, length), dtype=torch.long, device="cuda")
            mask = select()
            ms = timed(select, 1000)
            stage1 = timed(lambda: ops.sampled_column_scores(q, k, Visibility(zero, q_first=0), TERMS, rows=sampled,
                                                             window=window), 1000)
            rows.append({**base, "case": "selection", "r_row": r_row, "selection_ms": ms, "stage1_ms": stage1,
                         "share": ms / sdpa_ms, "density": mask.density()})
            print(json.dumps(rows[-1]), flush=True)
        for per_block, blocks in ((128, 64), (112, 64), (96, 64), (64, 64), (96, 256)):
            mask = clustered_mask(length, KV_HEADS, per_block, blocks)
            common = (Visibility(zero, streaming=none, sink=0, local=1, q_first=0, k_pos=None), TERMS)
            gathered = sparse_attention_triton(q, k, v, *common, stripe_mask=mask, whole_block_share=None)
            row = {**base, "case": "block_or_gather", "stripes_per_block": per_block, "blocks": blocks,
                   "density": mask.density(),
                   "gathered_ms": timed(lambda: sparse_attention_triton(q, k, v, *common, stripe_mask=mask,
                                                                        whole_block_share=None), 1000)}
            for share in (0.5, 0.75, 0.9):
                whole = sparse_attention_triton(q, k, v, *common, stripe_mask=mask, whole_block_share=share)
                row[f"whole_from_{share}_ms"] = timed(
                    lambda: sparse_attention_triton(q, k, v, *common, stripe_mask=mask, whole_block_share=share), 1000)
                row[f"whole_from_{share}_max_diff"] = float((gathered.float() - whole.float()).abs().max())
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--crossover", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_attention")
    parser.add_argument("--tune", action="store_true", help="time stage-1 kernel configurations at the first length")
    parser.add_argument("--costs", action="store_true",
                        help="selection cost by r_row and block-or-gather only (results/sample_attention_costs.json)")
    args = parser.parse_args()
    if args.tune:
        return tune(args.lengths[0])
    if args.costs:
        rows = costs(args.lengths)
        info = meta(device=torch.cuda.get_device_name(), dtype="bfloat16", extra={
            "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "batch": 1}, "rw": RW,
            "timing": "triton.testing.do_bench median, rep 1000 ms", "inputs": "synthetic(), clustered_mask()"})
        return write_results(args.out.with_name("sample_attention_costs"), info, rows)
    rows = crossover(args.crossover)
    for length in args.lengths:
        rows += run_length(length)
        save(args, rows)


def save(args, rows) -> None:
    wins = [r["L"] for r in rows if r["case"] == "crossover" and r["ms"] < r["dense_ms"]]
    info = meta(device=torch.cuda.get_device_name(), dtype="bfloat16", extra={
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "batch": 1}, "rw": RW, "r_row": R_ROW,
        "streaming": {"sink": SINK, "local": LOCAL}, "crossover_length": min(wins) if wins else None,
        "timing": "triton.testing.do_bench median; rep 200 ms (<= 32K) or 1000 ms",
        "inputs": "synthetic(): locality code + 4 sinks + 64 Zipf stripes per KV head + N(0,1) noise",
    })
    write_results(args.out, info, rows)
    plot(args.out.with_suffix(".png"), rows)


def plot(path: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    main_rows = [r for r in rows if r["case"] != "crossover"]
    for length in sorted({r["L"] for r in main_rows}):
        sel = [r for r in main_rows if r["L"] == length]
        ax.scatter([r["density"] for r in sel], [r["ms"] / r["sdpa_ms"] for r in sel], label=f"L = {length // 1024}K")
        for r in sel:
            ax.annotate(r["case"], (r["density"], r["ms"] / r["sdpa_ms"]), fontsize=6)
    ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle="--", label="time = density x SDPA")
    ax.set_xlabel("density (computed share of the causal matrix)")
    ax.set_ylabel("time / SDPA dense time")
    ax.set_title(f"SampleAttention prefill, one layer, {rows[0]['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
