"""Prefill attention of one layer on a GPU: our Triton kernel against SDPA and FlexAttention.

    python benchmarks/kernels/bench_prefill.py [--lengths 8192 32768 131072] [--configs]

Llama-3-8B attention shape: 32 query / 8 KV heads, head_dim 128, bf16, batch 1, causal. Cases:
``dense`` (every head dense), ``streaming50`` (half the KV heads stream: sink 128 + local 4096),
``blocksparse_d`` (seeded random 128x128 key blocks per KV head keeping about d of the causal matrix,
diagonal blocks always kept). Baselines in the same run: torch SDPA causal (dense work), and
FlexAttention (compiled) with the equivalent block mask; block-mask construction is not timed.
FLOPs of a case: 4 * heads * head_dim * (computed elements of the causal matrix) (QK^T and PV).
Medians of triton.testing.do_bench. Writes benchmarks/results/prefill.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

from sparse_attn_hf.block_mask import BlockSparseMask  # noqa: E402
from sparse_attn_hf.kernels.prefill import Launch, sparse_attention_triton  # noqa: E402
from sparse_attn_hf.ops import LogitTerms, Visibility  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, SINK, LOCAL, BLOCK = 32, 8, 128, 128, 4096, 128
DENSITIES = (0.10, 0.25, 0.50)


def timed(fn, rep_ms: float) -> float:
    return triton.testing.do_bench(fn, warmup=max(25, rep_ms / 4), rep=rep_ms, return_mode="median")


def streaming_density(length: int, streaming: torch.Tensor) -> float:
    """Computed share of the causal matrix with these heads streaming (sink + local window)."""
    pos = torch.arange(length, dtype=torch.float64)
    per_row = torch.clamp(pos + 1, max=LOCAL) + torch.clamp(torch.clamp(pos + 1 - LOCAL, min=0), max=SINK)
    stream_share = float(per_row.sum()) / (length * (length + 1) / 2)
    s = float(streaming.float().mean())
    return (1 - s) + s * stream_share


def flex_runner(q, k, v, mask_mod, length, blocks: BlockSparseMask | None = None):
    """FlexAttention, compiled. A random block mask is handed over as block lists (``from_kv_blocks``,
    full and partial as in our kernel): ``create_block_mask`` would evaluate the mask on L x L elements."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    if blocks is None:
        block_mask = create_block_mask(mask_mod, 1, HEADS, length, length, device="cuda", BLOCK_SIZE=BLOCK,
                                       _compile=True)
    else:
        groups = HEADS // KV_HEADS
        lists = []
        for part in blocks.full_and_partial():
            table = part.to_block_bool().repeat_interleave(groups, 0)[None].int()  # [1, Hq, nq, nk]
            lists += [table.sum(-1).int(), torch.argsort(table, dim=-1, descending=True, stable=True).int()]
        full_num, full_idx, part_num, part_idx = lists
        block_mask = BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                              mask_mod=lambda b, h, qi, ki: ki <= qi, seq_lengths=(length, length))
    # every case compiles anew (another mask); past dynamo's recompile limit flex_attention would fall back
    # to its unfused eager form, which builds the L x L score matrix
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def run_length(length: int, kernel: dict, flex: bool) -> list[dict]:
    torch.manual_seed(length)
    q = torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    kv_start = torch.zeros(1, dtype=torch.long, device="cuda")
    rep = 200 if length <= 32768 else 1500
    groups = HEADS // KV_HEADS
    sdpa_ms = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), rep)
    rows = []

    def ours(streaming, mask=None):
        visible = Visibility(kv_start, streaming=streaming, sink=SINK, local=LOCAL, q_first=0, k_pos=None)
        return lambda: sparse_attention_triton(q, k, v, visible, LogitTerms(HEAD_DIM**-0.5), block_mask=mask,
                                               launch=Launch(**kernel))

    none = torch.zeros(KV_HEADS, dtype=torch.bool, device="cuda")
    half = torch.arange(KV_HEADS, device="cuda") % 2 == 1
    cases = {
        "dense": (ours(none), lambda b, h, qi, ki: ki <= qi, 1.0),
        "streaming50": (
            ours(half),
            lambda b, h, qi, ki: (ki <= qi) & ((half[h // groups] == 0) | (ki < SINK) | (qi - ki < LOCAL)),
            streaming_density(length, half),
        ),
    }
    for density in DENSITIES:
        mask = BlockSparseMask.random(KV_HEADS, length, length, density, BLOCK, BLOCK, seed=1, device="cuda")
        cases[f"blocksparse_{density:.2f}"] = (ours(none, mask), None, mask.density(), mask)
    for name, (fn, mask_mod, density, *blocks) in cases.items():
        ms = timed(fn, rep)
        flex_ms = None
        if flex:
            try:
                flex_ms = timed(flex_runner(q, k, v, mask_mod, length, *blocks), rep)
            except Exception as error:  # recorded, so that the rest of the run still counts
                print(f"FlexAttention failed at L={length}, {name}: {type(error).__name__}: {error}"[:500], flush=True)
            torch.cuda.empty_cache()
        flops = 4 * HEADS * HEAD_DIM * density * length * (length + 1) / 2
        row = {"L": length, "case": name, "ms": ms, "sdpa_ms": sdpa_ms, "flex_ms": flex_ms, "density": density,
               "tflops": flops / ms / 1e9, "ratio_to_sdpa": ms / sdpa_ms,
               "device": torch.cuda.get_device_name()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def correctness(length: int = 4096 + 77) -> float:
    """Max error of the kernel against SDPA (dense, bf16) at a real size; printed, not timed."""
    q = torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                           enable_gqa=True).transpose(1, 2)
    visible = Visibility(torch.zeros(1, dtype=torch.long, device="cuda"),
                         streaming=torch.zeros(KV_HEADS, dtype=torch.bool, device="cuda"), sink=0, local=1, q_first=0,
                         k_pos=None)
    out = sparse_attention_triton(q, k, v, visible, LogitTerms(HEAD_DIM**-0.5))
    return float((out.float() - ref).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--block-m", type=int, default=128)
    parser.add_argument("--block-n", type=int, default=None, help="default: the kernel's tuned table")
    parser.add_argument("--num-warps", type=int, default=None)
    parser.add_argument("--num-stages", type=int, default=None)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "prefill")
    parser.add_argument("--merge", action="store_true", help="add the rows to an existing result file")
    parser.add_argument("--configs", action="store_true", help="time kernel configurations on the dense case")
    parser.add_argument("--variants", action="store_true", help="time code variants (TMA or pointer loads)")
    args = parser.parse_args()
    print("max |ours - sdpa| at 4173 tokens, bf16:", correctness(), flush=True)
    kernel = dict(block_m=args.block_m, block_n=args.block_n, num_warps=args.num_warps, num_stages=args.num_stages)
    if args.configs:
        return sweep(args.lengths[0])
    if args.variants:
        return variants(args.lengths)
    rows = []
    for length in args.lengths:
        rows += run_length(length, kernel, flex=not args.no_flex)
        save(args, kernel, rows)  # after every length: a later failure keeps what was measured


def save(args, kernel, rows) -> None:
    backends = torch.backends.cuda
    info = meta(device=torch.cuda.get_device_name(), dtype="bfloat16", extra={
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "batch": 1},
        "sink": SINK, "local": LOCAL, "mask_block": BLOCK, "kernel": kernel,
        "sdpa_backends": {"flash": backends.flash_sdp_enabled(), "efficient": backends.mem_efficient_sdp_enabled(),
                          "cudnn": backends.cudnn_sdp_enabled()},
        "timing": "triton.testing.do_bench median; rep 200 ms (<= 32K) or 1500 ms",
    })
    if args.merge and args.out.with_suffix(".json").exists():
        old = json.loads(args.out.with_suffix(".json").read_text())
        rows = [r for r in old["rows"] if r["L"] not in args.lengths] + rows
        info["command"] = old["meta"]["command"] + " ; " + info["command"]
    write_results(args.out, info, rows)
    plot(args.out.with_suffix(".png"), rows)


def sweep(length: int) -> None:
    q = torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    zero = torch.zeros(1, dtype=torch.long, device="cuda")
    none = torch.zeros(KV_HEADS, dtype=torch.bool, device="cuda")
    visible = Visibility(zero, streaming=none, sink=0, local=1, q_first=0, k_pos=None)
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 200)
    for block_m in (64, 128):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    try:
                        ms = timed(lambda: sparse_attention_triton(
                            q, k, v, visible, LogitTerms(HEAD_DIM**-0.5),
                            launch=Launch(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)), 200)
                    except Exception as error:  # out of shared memory and the like
                        print(f"config {block_m} {block_n} {warps} {stages}: {type(error).__name__}", flush=True)
                        continue
                    print(json.dumps({"L": length, "block_m": block_m, "block_n": block_n, "num_warps": warps,
                                      "num_stages": stages, "ms": ms, "sdpa_ms": sdpa, "ratio": ms / sdpa}), flush=True)


VARIANTS = {  # code variants still switchable; earlier ones and their figures are in NOTES.md
    "tma": {},
    "pointer_loads": {"tma": False},
}


def variants(lengths: list[int]) -> None:
    """Code variants of the kernel on the dense and streaming50 cases, timed in one run, interleaved
    twice (variant order reversed the second time) so that drift shows."""
    for length in lengths:
        q = torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        zero = torch.zeros(1, dtype=torch.long, device="cuda")
        rep = 200 if length <= 32768 else 1000
        sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), rep)
        for rnd, names in enumerate((list(VARIANTS), list(reversed(VARIANTS)))):
            for name in names:
                for case, streaming in (("dense", torch.zeros(KV_HEADS, dtype=torch.bool, device="cuda")),
                                        ("streaming50", torch.arange(KV_HEADS, device="cuda") % 2 == 1)):
                    visible = Visibility(zero, streaming=streaming, sink=SINK, local=LOCAL, q_first=0, k_pos=None)
                    ms = timed(lambda: sparse_attention_triton(
                        q, k, v, visible, LogitTerms(HEAD_DIM**-0.5), launch=Launch(**VARIANTS[name])), rep)
                    print(json.dumps({"L": length, "variant": name, "case": case, "round": rnd, "ms": ms,
                                      "sdpa_ms": sdpa, "ratio": ms / sdpa, "device": torch.cuda.get_device_name()}),
                          flush=True)


def plot(path: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for case in dict.fromkeys(r["case"] for r in rows):
        points = [(r["L"], r["ms"] / r["sdpa_ms"]) for r in rows if r["case"] == case]
        ax.plot(*zip(*points), marker="o", label=f"ours: {case}")
    flex = [(r["L"], r["flex_ms"] / r["sdpa_ms"]) for r in rows if r["case"] == "dense" and r.get("flex_ms")]
    if flex:
        ax.plot(*zip(*flex), marker="x", linestyle="--", label="FlexAttention: dense")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("time / SDPA dense time")
    ax.set_title(f"prefill attention, one layer, {rows[0]['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
