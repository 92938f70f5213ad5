"""Can a patched decode step be replayed from a CUDA graph, and what does a step cost then? (GPU)

    python benchmarks/kernels/decode_graph.py [--lengths 32768 131072] [--layers 32] [--steps 64]

The Llama-3-8B shape (random bf16 weights), half the KV heads streaming (sink 128, local 4096, decode window
256, budget 4096, reuse 4). A prompt of L tokens is prefilled into a SparseCache sized for L + 256 tokens;
then, inside ``cache.decoding()``, a few eager one-token forwards warm up (the ring shrinks to the decode
window, Triton compiles), and one forward is captured with ``torch.cuda.graph``: static token and position
tensors (the next step's values are copied in before each replay), no attention mask. The step's
counters live on the device (``SparseCache``'s step tensor), so a replay advances them itself.

* correctness (``--check-layers`` layers, L = 2048): greedy tokens of 24 replayed steps against 24 eager
  steps from the same prefill (two caches), and the largest logit difference;
* speed: ms per token, eager (wall time of N one-token forwards, synchronized at the end) against replay
  (N replays), at each length; the stock baselines are in ``bench_e2e.py``'s table.
Writes benchmarks/results/decode_graph.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from sparse_attn_hf import Profile, SparseCache, SparseConfig, patch_model
from sparse_attn_hf.compat import CACHE_ARG

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.e2e.bench_e2e import LSERVE  # noqa: E402
from benchmarks.common.llama8b import build  # noqa: E402
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402


class Stepper:
    """One-token decode forwards of ``model`` over ``cache``: eager, or replayed from a captured graph."""

    def __init__(self, model, cache, last_token: torch.Tensor, position: int):
        self.model, self.cache = model, cache
        self.ids = last_token.view(1, 1).clone()
        self.pos = torch.full((1, 1), position, dtype=torch.long, device="cuda")
        self.graph = None
        self.logits = None
        self.stream = torch.cuda.Stream()  # eager warm-up and capture on one side stream
        self.stream.wait_stream(torch.cuda.current_stream())
        takes = inspect.signature(model.model.forward).parameters
        self.extra = {"cache_position": self.pos[0]} if "cache_position" in takes else {}

    def _forward(self):
        return self.model(input_ids=self.ids, position_ids=self.pos, **self.extra, **{CACHE_ARG: self.cache},
                          use_cache=True).logits[:, -1]

    def eager(self) -> torch.Tensor:
        with torch.cuda.stream(self.stream):
            logits = self._forward()
            self.ids.copy_(logits.argmax(-1, keepdim=True))
            self.pos.add_(1)
        torch.cuda.current_stream().wait_stream(self.stream)
        return logits

    def capture(self) -> None:
        """Record one step; nothing runs until ``replay`` (the cache's host-side token count is then one
        ahead of the device's; no decode step reads it)."""
        self.graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), torch.cuda.graph(self.graph, stream=self.stream):
            self.logits = self._forward()
            self.ids.copy_(self.logits.argmax(-1, keepdim=True))
            self.pos.add_(1)
        torch.cuda.current_stream().wait_stream(self.stream)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


def patched(layers: int, max_len: int):
    model = build(layers, max_len)
    scores = torch.rand(layers, model.config.num_key_value_heads, generator=torch.Generator().manual_seed(0))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(**LSERVE, streaming_fraction=0.5,
                                                                        alpha=1.0))
    return model


@torch.no_grad()
def prefill(model, length: int, new_tokens: int):
    ids = torch.randint(3, model.config.vocab_size, (1, length), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(length))
    cache = SparseCache(model, max_cache_len=length + new_tokens)
    logits = model(ids, **{CACHE_ARG: cache}, logits_to_keep=1).logits[:, -1]
    return cache, logits.argmax(-1)


@torch.no_grad()
def check(layers: int, length: int = 2048, steps: int = 24) -> dict:
    """Greedy tokens of eager steps against replayed steps, from two caches with the same prefill."""
    model = patched(layers, length + 256)
    runs = {}
    for mode in ("eager", "graph"):
        cache, first = prefill(model, length, 256)
        with cache.decoding():
            stepper = Stepper(model, cache, first, length)
            tokens, logits = [], []
            for _ in range(3):  # warm-up, identical in both modes
                logits.append(stepper.eager().float())
                tokens.append(int(stepper.ids))
            if mode == "graph":
                stepper.capture()
            while len(tokens) < steps:
                logits.append((stepper.replay() if mode == "graph" else stepper.eager()).float().clone())
                tokens.append(int(stepper.ids))
        runs[mode] = (tokens, torch.stack(logits))
        del cache
    diff = float((runs["eager"][1] - runs["graph"][1]).abs().max())
    row = {"case": "check", "layers": layers, "L": length, "steps": steps,
           "same_tokens": runs["eager"][0] == runs["graph"][0], "max_logit_diff": diff}
    print(json.dumps(row), flush=True)
    del model
    torch.cuda.empty_cache()
    return row


def _ms_per_step(step, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


@torch.no_grad()
def timing(model, length: int, steps: int) -> dict:
    cache, first = prefill(model, length, 4 * steps + 16)
    with cache.decoding():
        stepper = Stepper(model, cache, first, length)
        for _ in range(3):
            stepper.eager()
        eager_ms = _ms_per_step(stepper.eager, steps)
        stepper.capture()
        stepper.replay()
        graph_ms = _ms_per_step(stepper.replay, steps)
    row = {"case": "timing", "L": length, "layers": model.config.num_hidden_layers, "steps": steps,
           "eager_ms_per_token": eager_ms, "graph_ms_per_token": graph_ms, "speedup": eager_ms / graph_ms}
    print(json.dumps(row), flush=True)
    del cache, stepper
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--check-layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_graph")
    args = parser.parse_args()
    rows = [check(args.check_layers)]
    model = patched(args.layers, max(args.lengths) + 4 * args.steps + 64)
    for length in args.lengths:
        rows.append(timing(model, length, args.steps))
        info = meta(torch.cuda.get_device_name(), "bfloat16", {
            "model": "Llama-3-8B shape (benchmarks/common/llama8b.py), random weights", "settings": LSERVE,
            "streaming_fraction": 0.5, "timing": "wall time of N steps, synchronized at the end"})
        write_results(args.out, info, rows)


if __name__ == "__main__":
    main()
