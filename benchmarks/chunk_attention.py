"""Attention of one prompt chunk on a GPU: which kernel for chunked prefill.

    python benchmarks/chunk_attention.py [--chunk 32768] [--prefixes 0 32768 229376 1015808]

A chunk of ``--chunk`` queries at the end of ``prefix + chunk`` keys (bottom-right causal), Llama-3-8B
attention shape with half the KV heads dense (16 query / 4 KV heads, head_dim 128, bf16, batch 1): what the
dense heads of one layer compute per chunk in ``generate(prefill_chunk_size=...)``. Backends, timed in one run:

* ``sdpa_lower_right``: SDPA with ``causal_lower_right`` (PyTorch sends it to its flash backend);
* ``package``: ``ops.dense_attention``, what the plugin runs for the dense heads of a chunk;
* ``triton``: the package's kernel (``q_first = prefix``);
* ``cudnn_split``: cuDNN twice with log-sum-exp (the prefix without mask, the chunk's own square with
  ``is_causal``), merged (``ops.split_causal_attention``), K/V repeated to every query head;
* ``cudnn_split_gqa``: the same with K/V as they are (what the package runs);
* ``flash_split``: the same with PyTorch's flash backend.

Also the streaming heads of the chunk (16 query / 4 KV heads) over sink + ring + chunk:
``streaming_chunk_slots`` with explicit slots (every key block visited), ``streaming_chunk_consecutive`` as
consecutive slots (sink and window blocks only; what the cache passes once the ring is past the sinks). Every output is compared with the Triton
kernel's. Writes benchmarks/results/chunk_attention.json and .png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

from sparse_attn_hf import ops  # noqa: E402
from sparse_attn_hf.kernels.prefill import sparse_attention_triton  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, SINK, LOCAL = 16, 4, 128, 128, 4096


def flops(chunk: int, prefix: int) -> float:
    """QK^T and PV over the visible keys of the chunk's rows."""
    return 4.0 * HEADS * HEAD_DIM * chunk * (prefix + (chunk + 1) / 2)


def split(op, q, k, v, prefix: int, scale: float) -> torch.Tensor:
    """ops.split_causal_attention with ``op``; a chunk with no prefix is one causal call."""
    if prefix == 0:
        return op(q, k, v, True, scale)[0]
    return ops.split_causal_attention(op, q, k, v, scale)


def _expand(k):
    return k.repeat_interleave(HEADS // KV_HEADS, dim=1)


def cudnn_op(q, k, v, causal, scale):  # K/V repeated to every query head
    k, v = _expand(k), _expand(v)
    return cudnn_gqa_op(q, k, v, causal, scale)


def cudnn_gqa_op(q, k, v, causal, scale):  # K/V as they are (does the op take GQA?)
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def flash_op(q, k, v, causal, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def run(chunk: int, prefix: int, rep_ms: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(prefix + chunk)
    k_len = prefix + chunk
    q = torch.randn(1, HEADS, chunk, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, KV_HEADS, k_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, KV_HEADS, k_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = HEAD_DIM ** -0.5
    start = torch.zeros(1, dtype=torch.long, device="cuda")
    no_stream = torch.zeros(KV_HEADS, dtype=torch.bool, device="cuda")
    backends = {
        "triton": lambda: sparse_attention_triton(q, k, v, q_first=prefix, k_pos=None, kv_start=start,
                                                  streaming=no_stream, sink=0, local=1, scale=scale),
        "sdpa_lower_right": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(chunk, k_len), scale=scale, enable_gqa=True).transpose(1, 2),
        "package": lambda: ops.dense_attention(q, k, v, kv_start=start, padded=False, scale=scale),
        "cudnn_split": lambda: split(cudnn_op, q, k, v, prefix, scale).transpose(1, 2),
        "cudnn_split_gqa": lambda: split(cudnn_gqa_op, q, k, v, prefix, scale).transpose(1, 2),
        "flash_split": lambda: split(flash_op, q, k, v, prefix, scale).transpose(1, 2),
    }
    rows, reference = [], None
    for name, fn in backends.items():
        row = {"backend": name, "chunk": chunk, "prefix": prefix, "heads": HEADS, "kv_heads": KV_HEADS}
        try:
            out = fn()
            torch.cuda.synchronize()
            if reference is None:
                reference = out.float()
            row["max_abs_err_vs_triton"] = (out.float() - reference).abs().max().item()
            del out
            ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms)
            row.update(ms=ms, tflops=flops(chunk, prefix) / ms / 1e9)
        except Exception as error:  # noqa: BLE001 - a backend that cannot run this shape is a result too
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        print(row, flush=True)
        rows.append(row)
    # the streaming heads of a chunk: sink + ring + chunk at explicit slots (every block visited)
    if prefix >= LOCAL + SINK:
        keys = SINK + LOCAL + chunk
        ks = torch.randn(1, KV_HEADS, keys, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        vs = torch.randn_like(ks)
        ring = torch.arange(prefix - LOCAL, prefix, device="cuda")
        pos = torch.cat([torch.arange(SINK, device="cuda"), ring, torch.arange(prefix, k_len, device="cuda")])[None]
        flags = torch.ones(KV_HEADS, dtype=torch.bool, device="cuda")
        fn = lambda: ops.sparse_attention(q, ks, vs, q_first=prefix, k_pos=pos, kv_start=start,  # noqa: E731
                                          streaming=flags, sink=SINK, local=LOCAL, scale=scale)
        # the same keys as consecutive slots (sinks, the ring in slot order, the chunk): what the cache passes
        # once the ring is past the sinks; only the sink's and the window's blocks are visited
        consecutive = lambda: ops.sparse_attention(  # noqa: E731
            q, ks, vs, q_first=SINK + LOCAL, k_pos=None, kv_start=start, streaming=flags, sink=SINK, local=LOCAL,
            scale=scale)
        err = (fn().float() - consecutive().float()).abs().max().item()
        window = 4.0 * HEADS * HEAD_DIM * chunk * (SINK + LOCAL)
        for name, run_it in (("streaming_chunk_slots", fn), ("streaming_chunk_consecutive", consecutive)):
            ms = triton.testing.do_bench(run_it, warmup=10, rep=rep_ms)
            row = {"backend": name, "chunk": chunk, "prefix": prefix, "keys": keys, "ms": ms,
                   "tflops_window_work": window / ms / 1e9, "max_abs_err_slots_vs_consecutive": err}
            print(row, flush=True)
            rows.append(row)
    return rows


def plot(path: Path, rows: list[dict], chunk: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["backend"] for r in rows if "tflops" in r):
        pts = [(r["prefix"] + chunk, r["tflops"]) for r in rows if r["backend"] == name and "tflops" in r]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("keys (prefix + chunk)")
    ax.set_ylabel("TFLOP/s (visible keys)")
    ax.set_title(f"one {chunk}-query chunk, 16 q / 4 KV heads, bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk", type=int, default=32768)
    parser.add_argument("--prefixes", type=int, nargs="+", default=[0, 32768, 229376, 1015808])
    parser.add_argument("--rep-ms", type=int, default=400)
    parser.add_argument("--out", type=Path, default=RESULTS / "chunk_attention")
    args = parser.parse_args()
    rows = []
    for prefix in args.prefixes:
        rows += run(args.chunk, prefix, args.rep_ms)
        torch.cuda.empty_cache()
    info = meta(torch.cuda.get_device_name(), "bfloat16", {"chunk": args.chunk})
    path = write_results(args.out, info, rows)
    plot(args.out.with_suffix(".png"), rows, args.chunk)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
