"""Make the shipped profile of the default model (SmolLM2-135M-Instruct) from attention statistics.

    python scripts/make_default_profile.py --out profiles/smollm2-135m-instruct.safetensors

Head score (default method "needle") = rank of the attention mass on the needle, at the rows that
predict the answer of passkey prompts whose answer is teacher-forced (see benchmarks/NOTES.md for
why not also the out-of-window mass on plain text, which the other methods use),
both measured with dense attention on the *calibration* half of the haystack (chapters 1-8) with keys
that the evaluation never uses. Deterministic: no sampling, ranks break ties by (layer, head).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

import torch
from tqdm import tqdm

from sparse_attn_hf import Profile
from sparse_attn_hf.default_model import NAME, load_default_model
from sparse_attn_hf.eval.haystack import haystack_sha256, haystack_text
from sparse_attn_hf.eval.passkey import make_keys, passkey_prompt
from sparse_attn_hf.profiler.attention_stats import needle_mass, out_of_window_mass, per_kv_head, rank_normalize

SINK, LOCAL = 64, 256
TEXT_TOKENS = 2048
PROMPTS = [(1024, 0.2), (1024, 0.6), (1024, 0.9), (2048, 0.1), (2048, 0.5), (2048, 0.8), (4096, 0.3), (4096, 0.7)]
CALIBRATION_SEED = 1234  # the evaluation uses seed 0
METHODS = {
    "combined": "max(rank(out-of-window mass), rank(needle mass))",
    "window": "rank(out-of-window mass)",
    "needle": "rank(needle mass)",
}


def signals(model, tokenizer) -> dict[str, torch.Tensor]:
    """Both signals per (layer, KV head), measured with dense attention on the calibration half."""
    kv_heads = model.config.num_key_value_heads
    text = tokenizer(haystack_text("calibration"), return_tensors="pt", add_special_tokens=False).input_ids
    window = per_kv_head(out_of_window_mass(model, text[:, :TEXT_TOKENS], SINK, LOCAL), kv_heads)
    needles = []
    keys = make_keys(len(PROMPTS), seed=CALIBRATION_SEED)
    for (length, depth), key in zip(tqdm(PROMPTS, desc="needle prompts"), keys):
        # start the filler at another place of the calibration half for each prompt
        prompt = passkey_prompt(tokenizer, length, depth, key, part="calibration", offset=len(needles) * 700)
        answer = tokenizer(" " + key, return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([prompt.input_ids, answer], dim=1)
        rows = slice(prompt.tokens - 1, ids.shape[1] - 1)  # the rows that predict the answer's tokens
        needles.append(needle_mass(model, ids, prompt.needle, rows))
    return {"window": window, "needle": per_kv_head(torch.stack(needles).mean(0), kv_heads)}


def head_scores(measured: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    window, needle = rank_normalize(measured["window"]), rank_normalize(measured["needle"])
    return {"combined": torch.maximum(window, needle), "window": window, "needle": needle}[method]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", default="profiles/smollm2-135m-instruct.safetensors")
    parser.add_argument("--method", choices=["combined", "window", "needle"], default="needle")
    parser.add_argument("--streaming-fraction", type=float, default=0.25,
                        help="default of the profile: the highest fraction whose passkey grid agrees with dense")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    scores = head_scores(signals(model, tokenizer), args.method)
    profile = Profile.from_scores(
        model, scores, model_name=NAME, streaming_fraction=args.streaming_fraction, sink_size=SINK,
        local_size=LOCAL,
        method=f"attention statistics: {METHODS[args.method]} per KV head (most demanding query head of its group)",
        calibration=f"haystack.txt chapters 1-8 (sha256 {haystack_sha256()[:16]}): {TEXT_TOKENS} tokens of text, "
        f"{len(PROMPTS)} passkey prompts {PROMPTS}, seed {CALIBRATION_SEED}",
        command="python " + shlex.join(["scripts/make_default_profile.py", *(argv or sys.argv[1:])]),
    )
    path = profile.save(args.out)
    print(profile.describe())
    print("streaming heads per layer:", profile.streaming_heads().sum(-1).tolist())
    print("saved", path)


if __name__ == "__main__":
    main()
