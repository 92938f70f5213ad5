"""One attention layer of the hybrid families on a GPU: the package's kernels against what stock Transformers runs.

    python benchmarks/kernels/bench_window_layers.py [--lengths 8192 32768] [--repeats 10]

Cases (bf16, batch 1, random inputs; one prefill attention call of one layer; the output is checked against the
stock computation first, max abs error in the row):

* ``window`` layers (Gemma 3 12B shape: 16 query / 8 KV heads, head_dim 256, window 1024; GPT-OSS shape: 64 / 8,
  head_dim 64, window 128): stock = SDPA with the boolean window mask Transformers builds for sliding layers;
  ours = the streaming kernel with sink 0 and local = window (``ops.sparse_attention``).
* ``sinks`` full layer (GPT-OSS shape, learned sinks) and ``softcap`` full layer (Gemma 2 9B shape: 16 / 8, head_dim
  256, cap 50): stock = its eager attention (the only stock path that computes the term: [H, L, L] scores);
  ours = the package's dense kernel with the term (``ops.dense_attention``). For scale, ``sdpa_ms``: SDPA causal
  without the term (what the layer would cost if it had none).

Writes benchmarks/results/window_layers.json and .png; ratios are within this run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparse_attn_hf import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

OUT = RESULTS / "window_layers"
SHAPES = {"gemma3": (16, 8, 256, 1024), "gpt_oss": (64, 8, 64, 128), "gemma2": (16, 8, 256, 4096)}


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def inputs(heads: int, kv_heads: int, dim: int, length: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, h, length, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            for h in (heads, kv_heads, kv_heads)]


def stock_eager(q, k, v, scale, sinks=None, softcap=None):
    """Transformers' eager attention of Gemma 2 (softcap) and GPT-OSS (sinks), causal, no padding."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(1, -1, length, 1).to(scores.dtype)], dim=-1)
        scores = scores - scores.amax(-1, keepdim=True)
        return (torch.softmax(scores, -1)[..., :-1].to(v.dtype) @ v).transpose(1, 2)
    return (torch.softmax(scores.float(), -1).to(v.dtype) @ v).transpose(1, 2)


def window_row(name, length, repeats):
    heads, kv_heads, dim, window = SHAPES[name]
    q, k, v = inputs(heads, kv_heads, dim, length)
    scale = dim ** -0.5
    slots = torch.arange(length, device="cuda")
    diff = slots[:, None] - slots[None, :]
    mask = ((diff >= 0) & (diff < window))[None, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def stock():
        return sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)

    def ours():
        visible = ops.Visibility(torch.zeros(1, dtype=torch.long, device="cuda"),
                                 streaming=torch.ones(kv_heads, dtype=torch.bool, device="cuda"), sink=0, local=window,
                                 q_first=0, k_pos=None)
        return ops.sparse_attention(q, k, v, visible, ops.LogitTerms(scale))

    error = (ours().float() - stock().float()).abs().max().item()
    stock_ms, ours_ms = timed(stock, repeats), timed(ours, repeats)
    return {"case": f"window ({name}, {window})", "L": length, "stock_ms": stock_ms, "ours_ms": ours_ms,
            "speedup": stock_ms / ours_ms, "max_abs_error": error, "stock": "SDPA with a window mask"}


def term_row(name, length, repeats):
    heads, kv_heads, dim, _ = SHAPES[name]
    q, k, v = inputs(heads, kv_heads, dim, length)
    scale = dim ** -0.5
    terms = {"sinks": torch.randn(heads, device="cuda")} if name == "gpt_oss" else {"softcap": 50.0}
    kv_start = torch.zeros(1, dtype=torch.long, device="cuda")
    row = {"case": f"{'sinks' if name == 'gpt_oss' else 'softcap'} ({name})", "L": length, "stock": "eager"}
    logit_terms = ops.LogitTerms(scale, **terms)
    row["ours_ms"] = timed(lambda: ops.dense_attention(q, k, v, logit_terms, kv_start=kv_start, padded=False),
                           repeats)
    row["sdpa_ms"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=True), repeats)
    try:
        reference = stock_eager(q, k, v, scale, **terms)
        row["max_abs_error"] = (ops.dense_attention(q, k, v, logit_terms, kv_start=kv_start, padded=False)
                                .float() - reference.float()).abs().max().item()
        del reference
        row["stock_ms"] = timed(lambda: stock_eager(q, k, v, scale, **terms), repeats)
        row["speedup"] = row["stock_ms"] / row["ours_ms"]
    except torch.OutOfMemoryError:
        row["stock_ms"], row["speedup"] = "oom", None
    torch.cuda.empty_cache()
    return row


def plot(path: Path, rows: list[dict], device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['case']}\n{r['L'] // 1024}K" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["stock_ms"] if isinstance(r["stock_ms"], float) else 0 for r in rows], 0.4,
           label="stock (SDPA + window mask / eager)")
    ax.bar([i + 0.2 for i in x], [r["ours_ms"] for r in rows], 0.4, label="sparse_attn_hf kernel")
    ax.set_xticks(list(x), labels, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("ms per layer call")
    ax.set_title(f"Hybrid-family attention layers, {device}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_window_layers.py measures a GPU.")
    rows = []
    for length in args.lengths:
        for make, name in ((window_row, "gemma3"), (window_row, "gpt_oss"), (term_row, "gpt_oss"),
                           (term_row, "gemma2")):
            try:
                rows.append(make(name, length, args.repeats))
            except torch.OutOfMemoryError as error:
                rows.append({"case": name, "L": length, "status": "oom", "reason": str(error)[:200]})
            torch.cuda.empty_cache()
            print(rows[-1], flush=True)
    device = torch.cuda.get_device_name()
    info = meta(device, "bfloat16", {"shapes": {k: dict(zip(("heads", "kv_heads", "head_dim", "window"), v))
                                                for k, v in SHAPES.items()}, "repeats": args.repeats})
    write_results(OUT, info, rows)
    plot(OUT.with_suffix(".png"), [r for r in rows if "ours_ms" in r], device)


if __name__ == "__main__":
    main()
