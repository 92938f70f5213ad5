"""Decode in one process after other configurations ran (issue 35): stock, exact all-dense, 50% streaming.

    python benchmarks/e2e/decode_sequence.py --lengths 32768,131072 [--profile]

One process, the 8B shape (random bf16 weights, ``max_position_embeddings`` 132096), plain ``generate()``; patch
and unpatch between configurations, in this order:

* ``stock``: sdpa + DynamicCache;
* ``dense_exact``: ``Profile.all_dense`` with ``token_budget`` >= the prompt (exact decoding), decode graph on;
* ``streaming50``: 50% streaming heads with LServe's settings (sink 128, local 4096, decode window 256, budget
  4096, reuse 4), decode graph on.

Per configuration and length: ``generate(max_new_tokens=1)`` twice (TTFT: the second), then
``generate(max_new_tokens=65)``; decode = (t65 - t1) / 64, t_k the k-th token out (synchronized). Each patched
row says how its decode steps ran (``graph``: captured steps replayed, ``eager``: steps run eagerly with the
reasons the package gave). ``--profile`` adds one call per row under the PyTorch profiler (decode steps 4-7)
and keeps its top operators. Writes benchmarks/results/decode_sequence.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

from sparse_attn_hf import Profile, SparseConfig, decode_graph, patch_model, unpatch_model  # noqa: E402
from sparse_attn_hf import last_call  # noqa: E402

LSERVE = dict(sink_size=128, local_size=4096, decode_local_size=256, token_budget=4096, reuse_interval=4)


class Clock(StoppingCriteria):
    """A synchronized timestamp per token out; optionally the profiler around decode steps 4-7."""

    def __init__(self, profiler=None):
        self.times, self.profiler = [], profiler

    def __call__(self, input_ids, scores, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.profiler is not None and len(self.times) == 4:
            self.profiler.start()
        if self.profiler is not None and len(self.times) == 8:
            torch.cuda.synchronize()
            self.profiler.stop()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def call(model, ids, new_tokens: int, profiler=None) -> list[float]:
    clock = Clock(profiler)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                         stopping_criteria=StoppingCriteriaList([clock]))
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return [t - start for t in clock.times]


def configure(model, name: str, length: int):
    if getattr(model, "_sparse_attn_state", None) is not None:
        unpatch_model(model)
    if name == "dense_exact":
        budget = 64 * -(-(length + 128) // 64)
        patch_model(model, Profile.all_dense(model), SparseConfig(token_budget=max(budget, 128)))
    elif name == "streaming50":
        scores = torch.rand(model.config.num_hidden_layers, model.config.num_key_value_heads,
                            generator=torch.Generator().manual_seed(0))
        patch_model(model, Profile.from_scores(model, scores),
                    SparseConfig(streaming_fraction=0.5, alpha=1.0, **LSERVE))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",") if x], default=[32768, 131072])
    parser.add_argument("--configs", type=lambda s: s.split(","), default=["stock", "dense_exact", "streaming50"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="the package's INFO messages too")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_sequence.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("sparse_attn_hf").setLevel(logging.INFO)
    from benchmarks.common.llama8b import build

    model = build(args.layers, 132096)
    ids_for = {n: torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
               for n in args.lengths}
    rows = []
    for length in args.lengths:
        for name in args.configs:
            configure(model, name, length)
            ids = ids_for[length]
            row = {"config": name, "L": length}
            first = [call(model, ids, 1)[0] for _ in range(2)]
            row["ttft_first_s"], row["ttft_s"] = first
            decode_graph.last_capture.clear()
            times = call(model, ids, 65)
            row["decode_ms_per_token"] = 1000 * (times[64] - times[0]) / 64
            steps = [1000 * (b - a) for a, b in zip(times, times[1:])]
            row["first_steps_ms"] = [round(t, 2) for t in steps[:6]]  # warm-up, capture, first replays
            row["steady_ms_per_token"] = sorted(steps[8:])[len(steps[8:]) // 2]  # median from step 10 on
            if name != "stock":
                row["last_call"] = last_call(model).as_dict()
                row["capture_s"] = decode_graph.last_capture.get("seconds")
            again = call(model, ids, 65)  # a second call: nothing left to compile
            row["decode_ms_per_token_again"] = 1000 * (again[64] - again[0]) / 64
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                call(model, ids, 10, profiler)
                averages = profiler.key_averages()
                row["profile_cuda"] = [(e.key, round(e.device_time_total / 1000, 3), e.count) for e in
                                       sorted(averages, key=lambda e: -e.device_time_total)[:12]]
                row["profile_cpu"] = [(e.key, round(e.cpu_time_total / 1000, 3), e.count) for e in
                                      sorted(averages, key=lambda e: -e.cpu_time_total)[:12]]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("profile")}), flush=True)
            if args.profile:
                print(json.dumps({"cuda": row["profile_cuda"], "cpu": row["profile_cpu"]}), flush=True)
            torch.cuda.empty_cache()
    if getattr(model, "_sparse_attn_state", None) is not None:
        unpatch_model(model)
    info = meta(device=torch.cuda.get_device_name(), dtype="bfloat16",
                extra={"layers": args.layers, "max_position_embeddings": 132096, "settings": LSERVE,
                       "decode_formula": "(t65 - t1) / 64"})
    write_results(args.out.with_suffix(""), info, rows)


if __name__ == "__main__":
    main()
