"""The shipped profile on text it never saw: answers and KL against dense attention (CPU).

    python benchmarks/fidelity/heldout_fidelity.py [--texts reporting story] [--lengths 1024 2048 4096] \
        [--rows default quarter]
    python benchmarks/fidelity/heldout_fidelity.py --rows quarter --selector oracle --quarter-lengths 1024 2048 \
        --out benchmarks/results/heldout_fidelity_oracle     # what the budget allows: the oracle's pages
    python benchmarks/fidelity/heldout_fidelity.py --kv-dtype fp8 --rows default quarter decode   # FP8 pages

The default model with its shipped profile at the profile's default streaming fraction. Cells: passkey and
needle prompts hidden in the text at ``--lengths`` x 5 depths x 2 offsets (60 by default,
``sparse_attn_hf.profiler.held_out.held_out_cells``); a cell is lost when dense attention answers it right and
the patched model does not. Texts: ``reporting`` is the half of CPython's reference manual that neither the
profile's fit (the story) nor the choice of its default fraction (the other half) saw; ``alice`` and ``lcet10``
public-domain prose of two other genres (``sparse_attn_hf.eval.prose``), held out as well; ``story`` is the
evaluation half of the package's own story, the genre the profile was fitted on (for the fit column). Per text:

* ``default budget``: the cells at the profile's token budget (4096: exact decoding at 1K and 2K; the 4K prompts,
  4096-4100 tokens, pass the budget by a page, so their decode steps select 63 of 64-65 pages), the
  first-answer-token KL, and the mean next-token KL over the first 4096 tokens of the text;
* ``budget 1/4``: the same cells with ``token_budget`` a quarter of each prompt in whole pages (256, 512 and
  1024 tokens at 1K, 2K and 4K), the share of dense-correct cells kept. With ``--selector oracle`` decode steps
  read the pages of highest true attention mass instead (``sparse_attn_hf.eval.page_oracle``): what a perfect
  page choice keeps at that budget.
* ``decode`` (``--rows decode``): what decode steps read, teacher-forced: the first ``--decode-prefix`` tokens of
  the text prefilled, the next ``--decode-steps`` fed one per decode step (each step reads the stored pages), at the
  default budget (exact while the context fits it) and at a quarter of the prefix. Next-token KL of ``--kv-dtype``'s
  pages against model-dtype pages and against dense attention (a DynamicCache), and the perplexity of each.
With ``--kv-dtype fp8`` every row stores the dense heads' pages in FP8 (rows carry ``kv_dtype``).
Rows carry their page ``selection`` (``two-stage``, the default since ``SparseConfig.shortlist``; ``bound``, Quest's
alone, rows from before; ``oracle``). Merges into benchmarks/results/heldout_fidelity.json (``meta.runs``: each
run's commit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from sparse_attn_hf import SparseConfig
from sparse_attn_hf.default_model import load_default_model
from sparse_attn_hf.profile import resolve_profile
from sparse_attn_hf.eval.haystack import haystack_text
from sparse_attn_hf.eval.heldout import heldout_text
from sparse_attn_hf.eval.prose import prose_text
from sparse_attn_hf.profile import find_profile
from sparse_attn_hf.profiler.held_out import held_out_cells, measure

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

OUT = RESULTS / "heldout_fidelity"
TEXTS = {"reporting": lambda: heldout_text("reporting"), "story": lambda: haystack_text("evaluation"),
         "alice": lambda: prose_text("alice"), "lcet10": lambda: prose_text("lcet10")}


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", nargs="+", choices=list(TEXTS), default=["reporting"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--text-tokens", type=int, default=4096)
    parser.add_argument("--rows", nargs="+", choices=["default", "quarter", "decode"], default=["default", "quarter"],
                        help="the default-budget row, the budget-1/4 rows, the teacher-forced decode rows")
    parser.add_argument("--selector", choices=["package", "oracle"], default="package",
                        help="the budget-1/4 rows' page choice: the package's, or the oracle's (slow)")
    parser.add_argument("--quarter-lengths", type=int, nargs="+", default=None,
                        help="the budget-1/4 rows of these lengths only (the cells stay those of --lengths)")
    parser.add_argument("--page-size", type=int, default=None,
                        help="the budget-1/4 rows with pages (and logical pages) of this many tokens, not the profile's")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a profile file in place of the shipped one (for example one calibrated on first use)")
    parser.add_argument("--kv-dtype", choices=["auto", "fp8"], default="auto",
                        help="how dense heads store their pages (SparseConfig.kv_dtype)")
    parser.add_argument("--decode-prefix", type=int, default=3072)
    parser.add_argument("--decode-steps", type=int, default=256)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    model, tokenizer = load_default_model()
    profile = find_profile(model) if args.profile is None else resolve_profile(model, str(args.profile))
    fraction = profile.streaming_fraction
    rows = []

    selection = args.selector if args.selector != "package" else ("two-stage" if SparseConfig().shortlist > 1
                                                                    else "bound")
    pages = {} if args.page_size is None else {"page_size": args.page_size, "logical_page_size": args.page_size}
    if pages:
        selection += f", pages of {args.page_size}"
    storage = {} if args.kv_dtype == "auto" else {"kv_dtype": args.kv_dtype}

    def done(row: dict) -> None:
        """Print the row and merge it into the results (rows of other texts, settings and selections stay; a
        stopped run keeps what it measured)."""
        row = {**row, **storage}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "cell_lost"}), flush=True)
        info = meta("cpu", "float32", {"model": "SmolLM2-135M-Instruct", "profile": str(profile.source),
                                       "streaming_fraction": fraction, "cells_per_text": len(cells),
                                       "lengths": args.lengths})
        path = args.out.with_suffix(".json")
        earlier = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
        mine = {_key(r) for r in rows}
        runs = dict(earlier["meta"].get("runs", {}))
        label = f"{', '.join(args.texts)}: {', '.join(args.rows)} rows, {selection} selection" + (
            f", {args.kv_dtype} pages" if storage else "")
        runs[label] = {k: info[k] for k in ("commit", "dirty", "date", "command") if k in info}
        info["runs"] = runs
        write_results(args.out, info, [r for r in earlier["rows"] if _key(r) not in mine] + rows)

    for name in args.texts:
        text = TEXTS[name]()
        text_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : args.text_tokens]
        started = time.time()
        cells = held_out_cells(tokenizer, text, lengths=args.lengths)
        if "decode" in args.rows:
            for budget in (profile.token_budget, args.decode_prefix // 4 // profile.page_size * profile.page_size):
                done({"text": name, "setting": f"decode, budget {budget}", "selection": selection,
                      **decode_kl(model, profile, text_ids, args.decode_prefix, args.decode_steps,
                                  {"token_budget": budget}, args.kv_dtype)})
        if "default" in args.rows:
            [row] = measure(model, tokenizer, profile, cells, [fraction], text_ids, stop_at_lost=None,
                            settings=storage)
            done({"text": name, "setting": "default budget", "lengths": args.lengths, **row,
                  "seconds": time.time() - started})
        if "quarter" not in args.rows:
            continue
        per_length = len(cells) // len(args.lengths)
        kept = dense_correct = 0
        for i, length in enumerate(args.lengths):
            if args.quarter_lengths and length not in args.quarter_lengths:
                continue
            page = args.page_size or profile.page_size
            budget = max(2, length // 4 // page) * page
            subset = cells[i * per_length : (i + 1) * per_length]
            with selector(args.selector, model) as recalls:
                [part] = measure(model, tokenizer, profile, subset, [fraction], text_ids[:, :16], stop_at_lost=None,
                                 settings={"token_budget": budget, **pages, **storage})
            dense_correct += part["dense_correct"]
            kept += part["dense_correct"] - part["lost"]
            if recalls:
                part["mass_recall"] = sum(recalls) / len(recalls)
            done({"text": name, "setting": f"budget {budget}", "selection": selection, "L": length, **part})
        done({"text": name, "setting": "budget 1/4", "selection": selection, "dense_correct": dense_correct, "kept": kept,
              "kept_share": kept / dense_correct if dense_correct else None,
              "lengths": args.quarter_lengths or args.lengths})


def _key(row: dict) -> tuple:
    """Rows of one text, setting, length, page selection and page storage replace each other (rows from before the
    two-stage selection carry no ``selection``: the bound alone)."""
    return row["text"], row["setting"], row.get("L"), row.get("selection", "bound"), row.get("kv_dtype", "auto")


@torch.no_grad()
def decode_kl(model, profile, text_ids, prefix: int, steps: int, settings: dict, kv_dtype: str) -> dict:
    """Teacher-forced decoding of ``text_ids[prefix : prefix + steps]`` after a prefill of the first ``prefix``
    tokens: next-token KL of ``kv_dtype`` pages against model-dtype pages and against dense attention, and each
    one's perplexity on those tokens (see the module docstring)."""
    import torch.nn.functional as F

    from sparse_attn_hf import SparseCache, patched
    from sparse_attn_hf.compat import CACHE_ARG
    from transformers import DynamicCache

    ids = text_ids[:, : prefix + steps].to(model.device)

    def run(cache, decoding):
        logits = [model(ids[:, :prefix], **{CACHE_ARG: cache}).logits[:, -1]]
        with decoding:
            for i in range(prefix, prefix + steps - 1):
                logits.append(model(ids[:, i : i + 1], **{CACHE_ARG: cache}).logits[:, -1])
        return F.log_softmax(torch.cat(logits).float(), dim=-1)  # [steps, V]: the prediction of token prefix + i

    logp = {"dense": run(DynamicCache(), contextlib.nullcontext())}
    for storage in ("auto", kv_dtype) if kv_dtype != "auto" else ("auto",):
        config = SparseConfig(streaming_fraction=profile.streaming_fraction, page_selection="always",
                              kv_dtype=storage, **settings)
        with patched(model, profile, config):
            cache = SparseCache(model)
            logp[storage] = run(cache, cache.decoding())
    target = ids[0, prefix : prefix + steps]
    kl = lambda p, q: float((p.exp() * (p - q)).sum(-1).mean())  # noqa: E731
    ppl = {name: float(torch.exp(-lp.gather(1, target[:, None]).mean())) for name, lp in logp.items()}
    row = {"prefix": prefix, "steps": steps, "kl_vs_dense": kl(logp["dense"], logp[kv_dtype]),
           "ppl": ppl[kv_dtype], "ppl_dense": ppl["dense"]}
    if kv_dtype != "auto":
        row.update(kl_vs_model_dtype_pages=kl(logp["auto"], logp[kv_dtype]), kl_model_dtype_pages_vs_dense=kl(
            logp["dense"], logp["auto"]), ppl_model_dtype_pages=ppl["auto"])
    return row


def selector(kind: str, model):
    """The page choice of decode steps: the package's own (no hook), or the oracle's (recording mass recall)."""
    if kind == "package":
        return contextlib.nullcontext([])
    from sparse_attn_hf.eval import page_oracle

    head_dim = model.config.hidden_size // model.config.num_attention_heads
    return page_oracle.recording(kind, scale=head_dim**-0.5)


if __name__ == "__main__":
    main()
