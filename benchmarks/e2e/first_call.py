"""The first ``generate()`` of a fresh process against a warm one (issue 28: at most 1.5x at 32K).

    python benchmarks/e2e/first_call.py [--length 32768] [--new-tokens 16]
    python benchmarks/e2e/first_call.py --dry-run      # the bookkeeping on a tiny model, on the CPU

Every variant runs in a process of its own (the 8B shape, random bf16 weights, one GPU, plain ``generate()``):
build the model, patch it (timed: ``patch_s``), then three calls on the same prompt: the first (``cold``) and two
more (``warm``: the second of them). Triton's disk cache is a fresh folder for a machine that never ran the
kernels, or the folder an earlier variant filled (what every later process on that machine finds):

* ``stock``: sdpa + DynamicCache, what the user had (its own first call pays CUDA's library start-up);
* ``patched_no_warm_up_fresh``: 50% streaming heads (LServe's settings), ``SparseConfig(warm_up=False)``, fresh
  Triton cache: the first call compiles every kernel it runs;
* ``patched_fresh``: the same with the default warm-up (``patch_model`` compiles on a synthetic prompt);
* ``patched_cached``: the default warm-up, Triton's cache as ``patched_fresh`` left it;
* ``patched_no_warm_up_cached``: no warm-up, the same cache.

Ratios: ``first_over_warm`` = cold TTFT / warm TTFT, and the same for the whole call (``call_first_over_warm``);
``decode_first_excess_s``: what the first call's decode steps took beyond the warm call's (kernels compiled there).
Writes benchmarks/results/first_call.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, StepClock, meta, write_results  # noqa: E402

LSERVE = dict(sink_size=128, local_size=4096, decode_local_size=256, token_budget=4096, reuse_interval=4)
VARIANTS = {  # name: (patched, warm_up, Triton cache: "fresh" or "shared")
    "stock": (False, False, "fresh"),
    "patched_no_warm_up_fresh": (True, False, "fresh"),
    "patched_fresh": (True, True, "shared_fill"),
    "patched_cached": (True, True, "shared"),
    "patched_no_warm_up_cached": (True, False, "shared"),
}


def child(args) -> dict:
    """One variant in this process: build, patch, three calls."""
    from transformers import StoppingCriteriaList

    from sparse_attn_hf import Profile, SparseConfig, patch_model

    cuda = not args.dry_run
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    patched, warm_up, _ = VARIANTS[args.variant]
    start = time.perf_counter()
    if cuda:
        from benchmarks.common.llama8b import build

        model = build(args.layers, args.length + 1024)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=args.length + 64)).eval()
    sync()
    row = {"variant": args.variant, "L": args.length, "build_s": time.perf_counter() - start}
    if patched:
        settings = dict(LSERVE, streaming_fraction=0.5, warm_up=warm_up) if cuda else dict(
            streaming_fraction=0.5, sink_size=4, local_size=16, decode_local_size=8, page_size=16,
            logical_page_size=4, token_budget=32, warm_up=warm_up)
        profile = Profile.from_scores(model, torch.rand(model.config.num_hidden_layers,
                                                        model.config.num_key_value_heads,
                                                        generator=torch.Generator().manual_seed(0)))
        sync()
        start = time.perf_counter()
        patch_model(model, profile, SparseConfig(**settings))
        sync()
        row["patch_s"] = time.perf_counter() - start
    ids = torch.randint(3, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1))
    ids = ids.to(model.device)
    calls = []
    for _ in range(3):
        clock = StepClock(sync)
        sync()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([clock]))
        sync()
        calls.append({"ttft_s": clock.times[0] - start, "call_s": time.perf_counter() - start})
    cold, warm = calls[0], calls[-1]
    row.update(ttft_first_s=cold["ttft_s"], ttft_warm_s=warm["ttft_s"], call_first_s=cold["call_s"],
               call_warm_s=warm["call_s"], first_over_warm=cold["ttft_s"] / warm["ttft_s"],
               call_first_over_warm=cold["call_s"] / warm["call_s"],
               decode_first_excess_s=(cold["call_s"] - cold["ttft_s"]) - (warm["call_s"] - warm["ttft_s"]),
               calls=calls)
    return row


def parent(args) -> None:
    shared = tempfile.mkdtemp(prefix="triton_shared_")
    rows = []
    for name in args.variants:
        cache = VARIANTS[name][2]
        env = dict(os.environ, TRITON_CACHE_DIR=shared if cache.startswith("shared") else tempfile.mkdtemp(
            prefix="triton_fresh_"))
        if cache == "shared_fill":  # the first process on a machine: the shared cache starts empty
            for path in Path(shared).glob("*"):
                subprocess.run(["rm", "-rf", str(path)], check=True)
        command = [sys.executable, __file__, "--child", "--variant", name, "--length", str(args.length),
                   "--new-tokens", str(args.new_tokens), "--layers", str(args.layers)] + (
            ["--dry-run"] if args.dry_run else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            rows.append({"variant": name, "L": args.length, "status": "error", "error": done.stderr[-2000:]})
            print(done.stderr[-2000:], file=sys.stderr)
            write(args, rows)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["triton_cache"] = cache.replace("_fill", " (emptied first)")
        rows.append(dict(row, status="ok"))
        print(json.dumps({k: v for k, v in row.items() if k != "calls"}), flush=True)
        write(args, rows)  # after every variant: a run stopped at its time limit keeps what it measured


def write(args, rows: list[dict]) -> None:
    device = torch.cuda.get_device_name() if not args.dry_run else "cpu (dry run)"
    info = meta(device=device, dtype="bfloat16" if not args.dry_run else "float32",
                extra={"layers": args.layers, "new_tokens": args.new_tokens, "settings": LSERVE,
                       "calls": "cold, then two more: warm is the third"})
    path = write_results(args.out.with_suffix(""), info, rows)
    plot(path, rows, device)


def plot(path: Path, rows: list[dict], device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in rows if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["variant"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r.get("patch_s", 0) for r in rows], 0.2, label="patch_model")
    ax.bar(list(x), [r["ttft_first_s"] for r in rows], 0.2, label="first call TTFT")
    ax.bar([i + 0.2 for i in x], [r["ttft_warm_s"] for r in rows], 0.2, label="warm TTFT")
    ax.set_xticks(list(x), names, rotation=15, fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title(f"First call of a fresh process, L={rows[0]['L'] if rows else '?'} ({device})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU: the bookkeeping only")
    parser.add_argument("--out", type=Path, default=RESULTS / "first_call.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run and args.length == 32768:
        args.length = 96
    if args.child:
        print(json.dumps(child(args)), flush=True)
    else:
        parent(args)


if __name__ == "__main__":
    main()
