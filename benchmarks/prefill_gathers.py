"""What a prefill layer with both head kinds spends on moving queries and outputs (GPU).

    python benchmarks/prefill_gathers.py [--lengths 32768 131072]

Llama-3-8B attention shape (32 query / 8 KV heads, head_dim 128, bf16, batch 1), half the KV heads dense.
The queries come as Transformers hands them over: a [B, Hq, L, D] view of [B, L, Hq, D] memory; the dense
heads' K/V as the SparseCache stores them ([B, H, L, D], contiguous). Timed, each alone (CUDA events via
``triton.testing.do_bench``, median):

* ``gather_heads_major``: the dense heads' queries gathered in the view's order (the old way:
  ``index_select`` on dim 1 of the [B, Hkv, G, L, D] view, a transposing copy);
* ``gather_token_major``: the same heads gathered in memory order (``index_select`` on the KV-head dim of
  [B, L, Hkv, G, D], rows of G x D contiguous), handed on as a [B, n, L, D] view;
* ``sdpa_q_contiguous`` / ``sdpa_q_token_major``: cuDNN causal attention of the dense heads with the query in
  either layout (K/V contiguous); ``query_copy``: the copy ``dense_attention`` made to equalize them;
* ``gather_token_major_runs``: the same, as slices of consecutive KV heads concatenated (``torch.cat``);
* ``gather_cat``: the plugin's gather (``attention._gather_heads``): slices of consecutive KV heads concatenated
  straight into the [B, n, L, D] layout of the cache's K/V;
* ``sdpa_all_token_major``: cuDNN with query, key and value all [B, L, H, D] in memory (as stock has them);
* ``scatter``: the dense heads' output written into the layer's [B, L, Hq, D] output (``index_copy_``);
  ``scatter_runs``: the same as one ``copy_`` per run of consecutive KV heads;
* ``streaming``: the streaming heads through our kernel (sink 128, local 4096), in place;
* ``layer``: ``attention._prefill`` end to end, as the plugin runs it.
Shares are of the layer's attention kernels (SDPA on the dense heads + the streaming kernel). Writes
benchmarks/results/prefill_gathers.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

from sparse_attn_hf import attention, ops
from sparse_attn_hf.cache import LayerKV

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

HEADS, KV_HEADS, DIM, SINK, LOCAL = 32, 8, 128, 128, 4096
GROUPS = HEADS // KV_HEADS


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")


def run(length: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(length)
    query = torch.randn(1, length, HEADS, DIM, device="cuda", generator=gen, dtype=torch.bfloat16).transpose(1, 2)
    key = torch.randn(1, KV_HEADS, length, DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    dense_idx = torch.tensor([1, 2, 5, 6], device="cuda")
    stream_idx = torch.tensor([0, 3, 4, 7], device="cuda")
    n = len(dense_idx)
    dense_key, dense_value = key[:, dense_idx].contiguous(), value[:, dense_idx].contiguous()
    scale = DIM**-0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def heads_major():
        return query.unflatten(1, (-1, GROUPS)).index_select(1, dense_idx).flatten(1, 2)

    def token_major():
        return query.transpose(1, 2).unflatten(2, (-1, GROUPS)).index_select(2, dense_idx).flatten(2, 3).transpose(1, 2)

    runs = [(1, 3), (5, 7)]  # dense_idx as runs of consecutive KV heads (known on the host at patch time)

    def token_major_runs():
        by_token = query.transpose(1, 2).unflatten(2, (-1, GROUPS))
        return torch.cat([by_token[:, :, a:b] for a, b in runs], dim=2).flatten(2, 3).transpose(1, 2)

    def scatter_runs():
        heads = out.unflatten(2, (-1, GROUPS))
        done = 0
        for a, b in runs:
            heads[:, :, a:b].copy_(dense_out[:, :, done * GROUPS:(done + b - a) * GROUPS].unflatten(2, (-1, GROUPS)))
            done += b - a

    q_hm, q_tm = heads_major(), token_major()
    assert torch.equal(q_hm, q_tm) and torch.equal(q_tm, token_major_runs())
    dense_out = sdpa(q_tm, dense_key, dense_value, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    check = sdpa(q_hm, dense_key, dense_value, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    max_err = float((dense_out.float() - check.float()).abs().max())
    out = torch.empty(1, length, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    zero = torch.zeros(1, dtype=torch.long, device="cuda")
    flags = torch.ones(n, dtype=torch.bool, device="cuda")
    kv = LayerKV(dense_key, dense_value, key, value, None, True)
    common = dict(q_first=0, kv_start=zero, sink=SINK, local=LOCAL, scale=scale, tile=256)
    row = {"L": length, "device": torch.cuda.get_device_name(), "max_err_layouts": max_err}
    row["gather_heads_major_ms"] = timed(heads_major)
    row["gather_token_major_ms"] = timed(token_major)
    row["gather_token_major_runs_ms"] = timed(token_major_runs)
    row["query_copy_ms"] = timed(lambda: q_tm.contiguous())
    row["sdpa_q_contiguous_ms"] = timed(lambda: sdpa(q_hm, dense_key, dense_value, is_causal=True, scale=scale,
                                                     enable_gqa=True))
    row["sdpa_q_token_major_ms"] = timed(lambda: sdpa(q_tm, dense_key, dense_value, is_causal=True, scale=scale,
                                                      enable_gqa=True))
    row["scatter_ms"] = timed(lambda: out.unflatten(2, (-1, GROUPS)).index_copy_(
        2, dense_idx, dense_out.unflatten(2, (n, GROUPS))))
    row["scatter_runs_ms"] = timed(scatter_runs)
    row["streaming_ms"] = timed(lambda: ops.sparse_attention(
        query, key, value, heads=stream_idx, groups=GROUPS, key_all_heads=True, out=out, streaming=flags,
        k_pos=None, **common))
    row["gather_cat_ms"] = timed(lambda: attention._gather_heads(query, runs, GROUPS))
    key_tm = torch.randn(1, length, KV_HEADS, DIM, device="cuda", generator=gen, dtype=torch.bfloat16).transpose(1, 2)
    value_tm = torch.randn_like(key_tm)
    k_tm = torch.cat([key_tm[:, a:b] for a, b in runs], 1).transpose(1, 2).contiguous().transpose(1, 2)
    v_tm = torch.cat([value_tm[:, a:b] for a, b in runs], 1).transpose(1, 2).contiguous().transpose(1, 2)
    row["sdpa_all_token_major_ms"] = timed(lambda: sdpa(q_tm, k_tm, v_tm, is_causal=True, scale=scale,
                                                        enable_gqa=True))
    row["layer_ms"] = timed(lambda: attention._prefill(query, kv, runs, stream_idx, flags, common, False))

    kernels = min(row["sdpa_q_contiguous_ms"], row["sdpa_q_token_major_ms"]) + row["streaming_ms"]
    row["kernels_ms"] = kernels
    for name in ("gather_heads_major", "gather_token_major", "gather_token_major_runs", "gather_cat", "query_copy",
                 "scatter", "scatter_runs"):
        row[f"{name}_share"] = row[f"{name}_ms"] / kernels
    row["layer_overhead_share"] = row["layer_ms"] / kernels - 1
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--out", type=Path, default=RESULTS / "prefill_gathers")
    args = parser.parse_args()
    rows = []
    for length in args.lengths:
        rows.append(run(length))
        print(json.dumps(rows[-1]), flush=True)
        info = meta(torch.cuda.get_device_name(), "bfloat16", {
            "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "batch": 1, "dense_kv_heads": 4},
            "streaming": {"sink": SINK, "local": LOCAL}, "timing": "triton.testing.do_bench median, rep 400 ms"})
        write_results(args.out, info, rows)


if __name__ == "__main__":
    main()
