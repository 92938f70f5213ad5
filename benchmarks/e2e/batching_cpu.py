"""Continuous batching on a CPU: ``model.generate_batch`` of the default model, patched against stock, in one run.

    python benchmarks/e2e/batching_cpu.py [--lengths 3000,2000,1000,2500] [--new-tokens 16] [--repeats 2]

Requests of held-out text (never used to fit the profile) of the given lengths, batched together, greedy; stock is
Transformers' own manager (sdpa over the packed requests with its block-diagonal mask), patched runs the package's
attention (``sparse_attn_hf.batching``: prompts per request, decode steps through the manager's block table). Wall
time of the whole ``generate_batch`` call, the median of ``--repeats`` after a first call of each; and how many
requests got the same tokens. Writes benchmarks/results/batching_cpu.json. The GPU benchmark of issue 33 is
``bench_serving.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

from sparse_attn_hf import patched  # noqa: E402
from sparse_attn_hf.default_model import load_default_model  # noqa: E402
from sparse_attn_hf.eval.heldout import heldout_text  # noqa: E402


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="3000,2000,1000,2500")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    model, tokenizer = load_default_model()
    text = tokenizer(heldout_text("reporting"), add_special_tokens=False).input_ids
    prompts = [text[i * 500 : i * 500 + n] for i, n in enumerate(lengths)]
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def timed() -> tuple[list[float], dict]:
        model.generate_batch(inputs=prompts, generation_config=config)  # the first call of this configuration
        times, out = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model.generate_batch(inputs=prompts, generation_config=config)
            times.append(time.perf_counter() - start)
        return times, {key: out[key].generated_tokens for key in out}

    stock_times, stock_tokens = timed()
    with patched(model):
        sparse_times, sparse_tokens = timed()
    rows = [{"config": name, "requests": len(prompts), "lengths": lengths, "new_tokens": args.new_tokens,
             "seconds": statistics.median(times), "seconds_repeated": times}
            for name, times in (("stock", stock_times), ("patched", sparse_times))]
    rows[1]["x_stock"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[1]["same_tokens"] = sum(sparse_tokens[key] == stock_tokens[key] for key in stock_tokens)
    for row in rows:
        print(row, flush=True)
    info = meta("cpu", "float32", {"model": "SmolLM2-135M-Instruct", "threads": torch.get_num_threads()})
    print("wrote", write_results(RESULTS / "batching_cpu", info, rows))


if __name__ == "__main__":
    main()
