"""Decoding on a CPU: the default model patched with its shipped profile against stock, in one run.

    python benchmarks/e2e/cpu_decode.py [--lengths 2000,6000] [--new-tokens 24] [--repeats 2]

Greedy ``generate()`` of the default model (SmolLM2-135M-Instruct, float32) on a prompt of the evaluation text
(never used to fit the profile), stock (sdpa + DynamicCache) and patched (shipped profile, SparseCache), alternating,
``--repeats`` times each; decode ms per token = (t_N - t_1) / (N - 1) from per-token timestamps, the median over
the repeats. Also the patched model's record (``last_call``). Writes benchmarks/results/cpu_decode.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

from sparse_attn_hf import last_call, patch_model, unpatch_model  # noqa: E402
from sparse_attn_hf.default_model import load_default_model  # noqa: E402
from sparse_attn_hf.eval.haystack import haystack_text  # noqa: E402



class Clock(StoppingCriteria):
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def decode_ms(model, ids, new_tokens: int) -> float:
    clock = Clock()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock]))
    return 1000 * (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 6000])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    tokens = tokenizer(haystack_text("evaluation"), add_special_tokens=False).input_ids
    rows = []
    for length in args.lengths:
        ids = torch.tensor([tokens[:length]])
        times = {"stock": [], "patched": []}
        record = None
        for _ in range(args.repeats):
            times["stock"].append(decode_ms(model, ids, args.new_tokens))
            patch_model(model)
            times["patched"].append(decode_ms(model, ids, args.new_tokens))
            record = last_call(model).as_dict()
            unpatch_model(model)
        row = {"L": length, "stock_ms": statistics.median(times["stock"]),
               "patched_ms": statistics.median(times["patched"]), "all_ms": times, "last_call": record}
        row["ratio"] = row["patched_ms"] / row["stock_ms"]
        rows.append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k != "last_call"},
              flush=True)
    info = meta(device="cpu", dtype="float32", extra={"threads": torch.get_num_threads(),
                                                      "model": "SmolLM2-135M-Instruct, shipped profile",
                                                      "new_tokens": args.new_tokens, "repeats": args.repeats})
    write_results(RESULTS / "cpu_decode", info, rows)


if __name__ == "__main__":
    main()
