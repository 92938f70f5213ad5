"""SampleAttention's own fidelity on held-out text: the shipped profile with SampleAttention at several
alphas against the same profile with it off (CPU).

    python benchmarks/fidelity/sample_attention_heldout.py [--alphas 0.9 0.95 0.98] [--lengths 2048 4096 8000]

The default model with its shipped profile (streaming heads at the profile's fraction), SampleAttention
from 1024 tokens on (``dense_below=1024``), passkey and needle prompts hidden in the reporting half of the
held-out text (``sparse_attn_hf.eval.heldout``: text neither the profile nor its choices saw), and mean
next-token KL over 4096 tokens of that text. The reference is the same model and profile with
SampleAttention off (alpha 1), so the rows measure what SampleAttention adds to the streaming heads.
Writes benchmarks/results/sample_attention_heldout.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_attn_hf import SparseConfig, patched
from sparse_attn_hf.default_model import load_default_model
from sparse_attn_hf.eval.heldout import heldout_text
from sparse_attn_hf.eval.needle import DEFAULT_NEEDLE, hide, needle_prompt, retrieval_score
from sparse_attn_hf.eval.passkey import ANSWER_PREFIX, INSTRUCTION, NEEDLE, QUESTION, answer, kl_divergence, make_keys
from sparse_attn_hf.eval.passkey import PasskeyPrompt

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402



def cells(tokenizer, text: str, lengths: list[int], depths: list[float]):
    keys = iter(make_keys(len(lengths) * len(depths), seed=11))
    for length in lengths:
        for i, depth in enumerate(depths):
            key = next(keys)
            ids, span = hide(tokenizer, text, length, depth, NEEDLE.format(key=key), QUESTION, ANSWER_PREFIX,
                             instruction=INSTRUCTION, offset=331 * i)
            yield "passkey", PasskeyPrompt(length, depth, key, ids, span), None
            yield "needle", needle_prompt(tokenizer, text, length, depth, offset=577 * i + 41), DEFAULT_NEEDLE


def correct(task: str, prompt, text: str) -> bool:
    return prompt.key in text if task == "passkey" else retrieval_score(text, DEFAULT_NEEDLE.answer_words) == 1.0


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--text-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_attention_heldout")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    text = heldout_text("reporting")
    configs = {1.0: SparseConfig(alpha=1.0)}
    configs.update({a: SparseConfig(alpha=a, dense_below=1024, record_masks=True) for a in args.alphas})
    started, records = time.time(), []
    for task, prompt, _ in cells(tokenizer, text, args.lengths, args.depths):
        answers = {}
        for alpha, config in configs.items():
            with patched(model, config=config):
                answers[alpha] = answer(model, tokenizer, prompt, max_new_tokens=12)
        reference, reference_logp = answers[1.0]
        for alpha in args.alphas:
            got, logp = answers[alpha]
            records.append({"task": task, "L": prompt.length, "depth": prompt.depth, "alpha": alpha,
                            "reference_answer": reference.strip(), "answer": got.strip(),
                            "reference_correct": correct(task, prompt, reference), "correct": correct(task, prompt, got),
                            "same": got.strip() == reference.strip(), "first_token_kl": kl_divergence(reference_logp, logp)})
            print({k: v for k, v in records[-1].items() if "answer" not in k}, flush=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : args.text_tokens]
    logps = {}
    for alpha, config in configs.items():
        with patched(model, config=config):
            logps[alpha] = F.log_softmax(model(ids, use_cache=False).logits[0].float(), dim=-1)
    rows = []
    for alpha in args.alphas:
        mine = [r for r in records if r["alpha"] == alpha]
        kept = [r for r in mine if r["reference_correct"]]
        rows.append({"alpha": alpha, "cells": len(mine), "reference_correct": len(kept),
                     "kept": sum(r["correct"] for r in kept),
                     "kept_share": sum(r["correct"] for r in kept) / max(len(kept), 1),
                     "same_answers": sum(r["same"] for r in mine),
                     "first_token_kl_mean": sum(r["first_token_kl"] for r in mine) / len(mine),
                     "text_kl_mean": float((logps[1.0].exp() * (logps[1.0] - logps[alpha])).sum(-1).mean()),
                     "text_tokens": ids.shape[1]})
        print(rows[-1], flush=True)
    info = meta("cpu", "float32", {"model": "SmolLM2-135M-Instruct", "profile": "shipped",
                                   "text": "sparse_attn_hf.eval.heldout, reporting half", "dense_below": 1024,
                                   "records": records, "seconds": time.time() - started})
    write_results(args.out, info, rows)


if __name__ == "__main__":
    main()
