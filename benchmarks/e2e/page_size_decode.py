"""The default model's page size, decided by decode speed on a GPU (issue 29): pages of 64 against pages of 16.

    python benchmarks/e2e/page_size_decode.py [--lengths 4096,8000] [--new-tokens 64]
    python benchmarks/e2e/page_size_decode.py --dry-run     # the bookkeeping on the CPU (a tiny model)

The SmolLM2-135M shape (the default model's configuration, random bf16 weights: decode speed depends on shapes, not
weights) with the shipped profile's head labels, greedy ``generate()`` on one GPU, the decode graph on:

* ``stock``: sdpa + DynamicCache;
* ``pages64``: the shipped profile's layout (pages of 64 tokens, logical pages of 16);
* ``pages16``: pages of 16 tokens (``SparseConfig(page_size=16, logical_page_size=16)``), the setting that kept 31
  of 34 dense-right held-out cells at a quarter budget against 27 for pages of 64 (docs/accuracy.md).

Each at the default token budget (4096) and at a quarter of the prompt, where page selection runs on every
prompt (rounded down to whole pages of 64); decode ms per token = (t_N - t_8) / (N - 8) of the second call. On a CPU page selection is off
(``page_selection="auto"``), so the page size does not change CPU decoding. Writes
benchmarks/results/page_size_decode.json and .png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, StepClock, meta, write_results  # noqa: E402

from sparse_attn_hf import Profile, SparseConfig, last_call, patch_model, unpatch_model  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[2] / "profiles" / "smollm2-135m-instruct.safetensors"


def smollm2_shape(dry_run: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    if dry_run:
        return LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def decode_ms(model, ids, new_tokens: int, sync) -> float:
    clock = StepClock(sync)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, eos_token_id=None, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    t = clock.times
    return 1000 * (t[-1] - t[7]) / (len(t) - 8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8000])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "page_size_decode.json")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.lengths, args.new_tokens = [512], 12
    elif not torch.cuda.is_available():
        raise SystemExit("page_size_decode.py measures a GPU; use --dry-run on a CPU.")
    sync = (lambda: None) if args.dry_run else torch.cuda.synchronize
    model = smollm2_shape(args.dry_run)
    shipped = Profile.load(SHIPPED)
    profile = Profile.from_scores(model, shipped.head_score, streaming_fraction=shipped.streaming_fraction,
                                  sink_size=shipped.sink_size, local_size=shipped.local_size,
                                  decode_local_size=shipped.decode_local_size)
    rows = []
    for length in args.lengths:
        ids = torch.randint(100, model.config.vocab_size, (1, length),
                            generator=torch.Generator().manual_seed(length)).to(model.device)
        for budget in (4096, max(128, length // 4 // 64 * 64)):  # a quarter, in whole pages of 64
            for variant, pages in (("stock", None), ("pages64", (64, 16)), ("pages16", (16, 16))):
                if variant == "stock" and budget != 4096:
                    continue
                if pages is not None:
                    patch_model(model, profile, SparseConfig(page_size=pages[0], logical_page_size=pages[1],
                                                             token_budget=budget, warm_up=False))
                decode_ms(model, ids, args.new_tokens, sync)  # the first call compiles and captures
                ms = decode_ms(model, ids, args.new_tokens, sync)
                row = {"variant": variant, "L": length, "token_budget": budget if pages else None, "decode_ms": ms}
                if pages is not None:
                    record = last_call(model).as_dict()
                    row.update(graph_steps=record["graph_steps"], decode_steps=record["decode_steps"])
                    unpatch_model(model)
                rows.append(row)
                print(row, flush=True)
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    info = meta(device=device, dtype=str(model.dtype).replace("torch.", ""),
                extra={"model": "SmolLM2-135M shape, random weights, the shipped profile's head labels",
                       "new_tokens": args.new_tokens, "decode_formula": "(t_N - t_8) / (N - 8), second call"})
    path = write_results(args.out.with_suffix(""), info, rows)
    plot(path, rows, device)
    print(f"wrote {path}")


def plot(path: Path, rows: list[dict], device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [f"{r['variant']}\nL={r['L']}" + (f"\nbudget {r['token_budget']}" if r["token_budget"] else "")
              for r in rows]
    ax.bar(range(len(rows)), [r["decode_ms"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("decode, ms per token")
    ax.set_title(f"Default model shape: pages of 64 against pages of 16 ({device})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
