"""A model with no profile given, on one GPU (issue 29): ``patch_model(model)`` and ``generate()``, as a user runs it.

    python benchmarks/e2e/first_use_gpu.py [--length 32768]
    python benchmarks/e2e/first_use_gpu.py --dry-run     # the bookkeeping on a tiny model, on the CPU

The Llama-3.1-8B-Instruct shape (its published configuration: vocabulary, 128K positions, llama3 RoPE; random bf16
weights) is measured three ways in one process, against stock on the same prompt:

* ``shipped``: named as the published checkpoint (``meta-llama/Llama-3.1-8B-Instruct``): the shipped DuoAttention
  profile is chosen by name and configuration;
* ``calibrated_fresh``: the same shape under a fine-tune's name: no shipped profile may be given to it, so
  ``patch_model`` calibrates one on first use (``calibration_s``: the statistics alone; ``patch_s``: all of
  ``patch_model``, its warm-up included), into an empty cache folder;
* ``calibrated_cached``: a second ``patch_model`` of that model: the profile comes from the cache folder.

Each row: which profile was used, ``patch_s``, TTFT of a first and a second ``generate()`` of ``--length`` tokens,
decode ms per token, how many decode steps replayed the CUDA graph. Writes benchmarks/results/first_use_gpu.json
and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, StepClock, meta, write_results  # noqa: E402

FINE_TUNE = "someone/Llama-3.1-8B-Instruct-medical-sft"


def build(args):
    from transformers import AutoModelForCausalLM

    from sparse_attn_hf.profiler.published import PUBLISHED

    entry = PUBLISHED[0]  # Llama-3.1-8B-Instruct
    config = entry.config()
    config.max_position_embeddings = entry.match["max_position_embeddings"]
    config.rope_parameters = dict(entry.match["rope_parameters"])
    config._name_or_path = entry.checkpoint
    if args.dry_run:  # the same family at a tiny size (no shipped profile can match it)
        config.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=512))
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval(), entry
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval(), entry


def timed_generate(model, ids, new_tokens: int, sync) -> dict:
    from transformers import StoppingCriteriaList

    clock = StepClock(sync)
    sync()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, eos_token_id=None, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    sync()
    t = clock.times
    return {"ttft_s": t[0] - start, "decode_ms_per_token": 1000 * (t[-1] - t[7]) / (len(t) - 8)}


def measure(model, ids, args, sync) -> dict:
    first = timed_generate(model, ids, args.new_tokens, sync)
    second = timed_generate(model, ids, args.new_tokens, sync)
    row = {"ttft_first_s": first["ttft_s"], "ttft_s": second["ttft_s"],
           "decode_ms_per_token": second["decode_ms_per_token"]}
    if getattr(model, "_sparse_attn_state", None) is not None:
        from sparse_attn_hf import last_call

        record = last_call(model).as_dict()
        row.update(graph_steps=record["graph_steps"], decode_steps=record["decode_steps"],
                   eager_reasons=record["eager_reasons"])
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU: the bookkeeping only")
    parser.add_argument("--out", type=Path, default=RESULTS / "first_use_gpu.json")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.length = min(args.length, 160)
    elif not torch.cuda.is_available():
        raise SystemExit("first_use_gpu.py measures a GPU; use --dry-run on a CPU.")
    os.environ["SPARSE_ATTN_HF_CACHE"] = tempfile.mkdtemp(prefix="sparse_attn_hf_cache_")  # a first use
    from sparse_attn_hf import patch_model, unpatch_model

    sync = torch.cuda.synchronize if torch.cuda.is_available() and not args.dry_run else (lambda: None)
    model, entry = build(args)
    ids = torch.randint(model.config.vocab_size // 10, model.config.vocab_size, (1, args.length),
                        generator=torch.Generator().manual_seed(1)).to(model.device)
    rows = [dict(variant="stock", **measure(model, ids, args, sync))]
    names = [("shipped", entry.checkpoint), ("calibrated_fresh", FINE_TUNE), ("calibrated_cached", FINE_TUNE)]
    if args.dry_run:
        names = names[1:]  # a tiny model has no shipped profile
    for variant, name in names:
        model.config._name_or_path = name
        sync()
        start = time.perf_counter()
        patch_model(model)
        sync()
        patch_s = time.perf_counter() - start
        profile = model._sparse_attn_state.profile
        row = {"variant": variant, "name_or_path": name, "profile": profile.model_name or "(calibrated)",
               "profile_method": profile.method, "patch_s": patch_s,
               "calibration_s": getattr(profile, "seconds", None) if variant == "calibrated_fresh" else None,
               "streaming_fraction": profile.streaming_fraction}
        row.update(measure(model, ids, args, sync))
        rows.append(row)
        print(row, flush=True)
        unpatch_model(model)
    device = torch.cuda.get_device_name() if sync is not None and not args.dry_run else "cpu (dry run)"
    info = meta(device=device, dtype=str(model.dtype).replace("torch.", ""),
                extra={"model": "Llama-3.1-8B-Instruct shape (published configuration), random weights",
                       "length": args.length, "new_tokens": args.new_tokens, "fine_tune_name": FINE_TUNE})
    path = write_results(args.out.with_suffix(""), info, rows)
    plot(path, rows, device, args.length)
    print(f"wrote {path}")


def plot(path: Path, rows: list[dict], device: str, length: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r.get("patch_s") or 0 for r in rows], 0.2, label="patch_model (s)")
    ax.bar(list(x), [r["ttft_first_s"] for r in rows], 0.2, label="first TTFT (s)")
    ax.bar([i + 0.2 for i in x], [r["ttft_s"] for r in rows], 0.2, label="second TTFT (s)")
    ax.set_xticks(list(x), [r["variant"] for r in rows], fontsize=8)
    ax.set_title(f"patch_model(model) with no profile given, Llama-3.1-8B shape, L={length} ({device})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
