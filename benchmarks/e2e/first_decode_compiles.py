"""Which Triton kernels a patched ``generate()`` compiles after ``patch_model``'s warm-up, and in which call.

    python benchmarks/e2e/first_decode_compiles.py [--lengths 32768 8192 131072] [--layers 4]

A fresh Triton cache folder, the Llama-3-8B shape (random bf16 weights, ``--layers`` deep: the kernels and their
shapes do not depend on the depth), ``patched_default`` as bench_e2e patches it. Triton's JIT cache hook logs
every specialisation a process sees for the first time (a compile, with a fresh folder): first during
``patch_model``, then in a call per prompt length, then in a second call of the same length (which must log
none). Each event names the kernel and its compile-time constants, so that a constant that follows the prompt
length (a bucket the warm-up did not cover) shows. Writes benchmarks/results/first_decode_compiles.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_fresh_")  # before Triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.e2e.bench_e2e import LSERVE, configure  # noqa: E402
from benchmarks.common.llama8b import build  # noqa: E402
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

EVENTS: list[dict] = []
PHASE = ["start"]


def _hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled, **_):  # noqa: A002 (Triton's names)
    constants = {str(k): v for k, v in (compile.get("constants") or {}).items()
                 if isinstance(v, (int, float, bool, str))}
    EVENTS.append({"phase": PHASE[0], "kernel": fn.name, "constants": constants, "t": time.perf_counter()})
    return False  # go on and compile


def install_hook() -> None:
    try:
        from triton import knobs

        knobs.runtime.jit_cache_hook = _hook
    except (ImportError, AttributeError):  # older Triton
        from triton.runtime.jit import JITFunction

        JITFunction.cache_hook = _hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 8192, 131072])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "first_decode_compiles")
    args = parser.parse_args()
    install_hook()
    model = build(args.layers, max(args.lengths) + args.new_tokens + 64)
    scores = torch.rand(args.layers, model.config.num_key_value_heads, generator=torch.Generator().manual_seed(0))
    PHASE[0] = "patch_model"
    start = time.perf_counter()
    configure(model, "patched_default", LSERVE, scores)
    rows = [{"phase": "patch_model", "seconds": time.perf_counter() - start}]
    for length in args.lengths:
        ids = torch.randint(3, model.config.vocab_size, (1, length), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(length))
        for call in ("first", "repeat"):
            PHASE[0] = f"{call} call at {length}"
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=0)
            torch.cuda.synchronize()
            rows.append({"phase": PHASE[0], "seconds": time.perf_counter() - start})
    for row in rows:
        row["compiles"] = [{"kernel": e["kernel"], "constants": e["constants"]} for e in EVENTS
                           if e["phase"] == row["phase"]]
        print(f"{row['phase']}: {row['seconds']:.2f} s, {len(row['compiles'])} new specialisations")
        if row["phase"] != "patch_model":
            for event in row["compiles"]:
                print("   ", event["kernel"], event["constants"])
    info = meta(torch.cuda.get_device_name(), "bfloat16", {"layers": args.layers, "settings": LSERVE,
                                                           "new_tokens": args.new_tokens})
    print(f"wrote {write_results(args.out, info, rows)}")


if __name__ == "__main__":
    main()
