"""Page selection against an oracle on the default model and held-out text (CPU).

    python benchmarks/fidelity/page_selection_oracle.py [--lengths 2048 4096 8180] [--depths 0.1 0.3 0.5 0.7 0.9]

Every head dense (so that only page selection acts), passkey and needle prompts hidden in the reporting half
of the held-out text (``sparse_attn_hf.eval.heldout``: the Python reference manual, shipped with CPython),
at budgets of 1/8, 1/4 and 1/2 of the context in whole 64-token pages. Per prompt the cache is
prefilled once (exact dense attention) and copied for every (budget, selector); the decode steps then read
the pages that Quest's bound ranks first, or the pages of highest true attention mass (the oracle,
``sparse_attn_hf.eval.page_oracle``). Per cell: the answers and whether each equals dense's (whose budget
holds the whole context), and the attention-mass recall of every decode step, layer and KV head.
8180 tokens stay under the model's 8192 trained positions; there dense itself often fails the tasks, so
recall is the judge. Writes benchmarks/results/page_selection_oracle.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sparse_attn_hf import Profile, SparseCache, SparseConfig, patched
from sparse_attn_hf.compat import CACHE_ARG
from sparse_attn_hf.default_model import load_default_model
from sparse_attn_hf.eval import page_oracle
from sparse_attn_hf.eval.heldout import heldout_text
from sparse_attn_hf.eval.needle import DEFAULT_NEEDLE, needle_prompt
from sparse_attn_hf.eval.passkey import ANSWER_PREFIX, INSTRUCTION, NEEDLE, QUESTION, make_keys
from sparse_attn_hf.eval.needle import hide

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

PAGE = 64


def clone_cache(model, cache: SparseCache) -> SparseCache:
    """An independent copy of a prefilled SparseCache (its buffers cloned)."""
    copy = SparseCache(model)
    for old, new in zip(cache.layers, copy.layers):
        new.__dict__.update({k: v for k, v in old.__dict__.items() if k not in ("sequence", "_tensors")})
        new._tensors = {k: v.clone() for k, v in old._tensors.items()}
    copy.sequence.kv_start, copy.sequence.max_kv_start = cache.sequence.kv_start, cache.sequence.max_kv_start
    return copy


def prompts(tokenizer, text: str, length: int, depths: list[float]):
    """(task, depth, expected, input_ids) for passkey and needle prompts at each depth."""
    for i, (depth, key) in enumerate(zip(depths, make_keys(len(depths), seed=7))):
        ids, _ = hide(tokenizer, text, length, depth, NEEDLE.format(key=key), QUESTION, ANSWER_PREFIX,
                      instruction=INSTRUCTION, offset=997 * i)
        yield "passkey", depth, key, ids
        yield "needle", depth, " ".join(DEFAULT_NEEDLE.answer_words), needle_prompt(
            tokenizer, text, length, depth, offset=1499 * i + 211).input_ids


def plot(path: Path, rows: list[dict]) -> None:
    """Mass recall against the budget (share of the context), one line per length and selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    kinds = [k for k in page_oracle.KINDS if any(f"{k}_mass_recall" in r for r in rows)]
    for length in sorted({r["L"] for r in rows}):
        mine = sorted((r for r in rows if r["L"] == length), key=lambda r: r["budget"])
        for kind, style in zip(kinds, ("-", "--", ":")):
            ax.plot([r["budget"] / length for r in mine], [r[f"{kind}_mass_recall"] for r in mine], style, marker="o",
                    label=f"{kind}, L={length}")
    ax.set_xlabel("budget / context")
    ax.set_ylabel("attention-mass recall")
    ax.set_title("page selection: Quest's bound against the oracle (default model, held-out text)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8180])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--logical-page-size", type=int, default=16, help="Quest's statistics granularity (8: finer)")
    parser.add_argument("--selectors", nargs="+", default=["quest", "oracle"], choices=list(page_oracle.KINDS))
    parser.add_argument("--out", type=Path, default=RESULTS / "page_selection_oracle")
    parser.add_argument("--replot", action="store_true", help="draw the PNG from the existing JSON and stop")
    args = parser.parse_args(argv)
    if args.replot:
        return plot(args.out.with_suffix(".png"), json.loads(args.out.with_suffix(".json").read_text())["rows"])
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    text = heldout_text("reporting")
    scale = model.config.head_dim ** -0.5
    cells, rows, started = [], [], time.time()
    config = SparseConfig(page_size=PAGE, logical_page_size=args.logical_page_size, token_budget=2 * PAGE,
                          page_selection="always")
    with patched(model, Profile.all_dense(model), config):
        for length in args.lengths:
            budgets = [max(2, length // PAGE // d) * PAGE for d in (8, 4, 2)]
            for task, depth, expected, ids in prompts(tokenizer, text, length, args.depths):
                prefilled = SparseCache(model)
                model(ids[:, :-1], **{CACHE_ARG: prefilled})  # exact: every head dense, no decode step

                def run(budget: int, kind: str | None):
                    cache = clone_cache(model, prefilled)
                    for layer in cache.layers:
                        layer.token_budget = budget
                    with page_oracle.recording(kind or "quest", scale=scale) as recalls:
                        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                             **{CACHE_ARG: cache})
                    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), recalls

                dense, _ = run(budget=ids.shape[1] + args.new_tokens + PAGE, kind=None)
                for budget in budgets:
                    cell = {"L": length, "task": task, "depth": depth, "budget": budget, "prompt_tokens": ids.shape[1],
                            "dense_answer": dense, "dense_correct": all(w in dense for w in expected.split())}
                    for kind in args.selectors:
                        answer, recalls = run(budget, kind)
                        cell[f"{kind}_answer"] = answer
                        cell[f"{kind}_same"] = answer == dense
                        cell[f"{kind}_mass_recall"] = statistics.mean(recalls)
                        cell[f"{kind}_mass_recall_min"] = min(recalls)
                    cells.append(cell)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in cell.items()
                           if "answer" not in k}, flush=True)
            for budget in budgets:
                mine = [c for c in cells if c["L"] == length and c["budget"] == budget]
                row = {"L": length, "budget": budget, "cells": len(mine), "logical_page_size": args.logical_page_size,
                       "dense_correct": sum(c["dense_correct"] for c in mine)}
                for kind in args.selectors:
                    row[f"{kind}_mass_recall"] = statistics.mean(c[f"{kind}_mass_recall"] for c in mine)
                    row[f"{kind}_same_answers"] = sum(c[f"{kind}_same"] for c in mine)
                    row[f"{kind}_same_on_dense_correct"] = sum(c[f"{kind}_same"] for c in mine if c["dense_correct"])
                rows.append(row)
                print(rows[-1], flush=True)
            info = meta("cpu", "float32", {"model": "SmolLM2-135M-Instruct", "text": "pydoc_data.topics (CPython)",
                                           "page_size": PAGE, "logical_page_size": args.logical_page_size,
                                           "new_tokens": args.new_tokens,
                                           "profile": "all dense (page selection alone)", "cells": cells,
                                           "seconds": time.time() - started})
            write_results(args.out, info, rows)
            plot(args.out.with_suffix(".png"), rows)


if __name__ == "__main__":
    main()
