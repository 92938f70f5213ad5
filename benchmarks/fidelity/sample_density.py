"""SampleAttention's chosen density per layer on real weights and real text (CPU).

    python benchmarks/fidelity/sample_density.py [--lengths 8192 16384 32768] [--r-row 0.025] [--layer-outputs dense]

The default model (SmolLM2-135M-Instruct, 30 layers, trained to 8192 positions), every head dense,
SampleAttention at the package's defaults (alpha 0.95, rw 0.08, r_row 0.025, mean criterion) from the first
token on. By default every layer passes on exact dense attention (``--layer-outputs dense``): each layer
chooses its mask on the model's own inputs, and the CPU skips the stripe reference (``sample`` runs it: the
choices then compound through the layers, and 32K takes hours). The text is the Python reference manual's topics (``sparse_attn_hf.eval.heldout``, shipped with
every CPython, PSF licence): prose and code the profile never saw. Past 8192 tokens the positions are
extended by linear RoPE scaling (factor L / 8192): that is extrapolation, not how the model was
trained, and the densities there say how concentrated attention stays, not what a long-context model
would choose. Per layer: the density of the mask (window + stripes over the causal matrix) and the cost
the cost model predicts for it (``sparse_attn_hf.cost``, 1 = dense attention). Writes
benchmarks/results/sample_density.json; ``bench_e2e.py``'s ``patched_sample_pinned`` row replays these
densities on the 8B shape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from sparse_attn_hf import Profile, SparseConfig, ops, patched
from sparse_attn_hf.default_model import load_default_model
from sparse_attn_hf.eval.heldout import heldout_text

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402



def set_linear_rope(model, factor: float) -> None:
    """Linear position interpolation by ``factor`` (1: the model as trained)."""
    config = model.config
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "linear" if factor > 1 else "default", "factor": factor,
                              "rope_theta": theta}
    decoder = model.get_decoder()
    decoder.rotary_emb = type(decoder.rotary_emb)(config=config)


@contextlib.contextmanager
def _layer_outputs(kind: str):
    """``"dense"``: SampleAttention chooses its mask as usual (recorded), but the layer passes on exact
    dense attention, so every layer chooses on the model's own inputs, and a CPU skips the stripe reference."""
    if kind == "sample":
        yield
        return
    original = ops.stripe_attention

    def dense(query, key, value, mask, terms, *, tile=256):
        return ops.dense_attention(query, key, value, terms, kv_start=mask.kv_start, padded=False)

    ops.stripe_attention = dense
    try:
        yield
    finally:
        ops.stripe_attention = original


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--alpha", type=float, default=0.95)
    parser.add_argument("--r-row", type=float, default=None, help="sampled row fraction (default: the config's)")
    parser.add_argument("--layer-outputs", choices=("dense", "sample"), default="dense",
                        help="what each layer passes on: dense attention (each layer chooses on exact inputs; fast) "
                             "or SampleAttention's own output (the stripe reference: hours at 32K on a CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_density")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    trained = model.config.max_position_embeddings
    ids = tokenizer(heldout_text("all"), return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < max(args.lengths):
        raise SystemExit(f"the text has {ids.shape[1]} tokens, fewer than {max(args.lengths)}")
    config = SparseConfig(alpha=args.alpha, dense_below=0, r_row=args.r_row, sample_stop_after=0)  # every layer
    # rows of other lengths or settings already in the file stay (runs of one length each take long on a CPU)
    out = args.out.with_suffix(".json")
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for length in args.lengths:
        factor = max(1.0, length / trained)
        set_linear_rope(model, factor)
        started = time.time()
        with patched(model, Profile.all_dense(model), config), _layer_outputs(args.layer_outputs):
            model.get_decoder()(ids[:, :length])
            choices = dict(sorted(model._sparse_attn_state.sample_choices.items()))
        row = {"L": length, "rope_factor": factor, "extrapolated": factor > 1, "alpha": args.alpha,
               "r_row": config.r_row or Profile.all_dense(model).r_row, "layer_outputs": args.layer_outputs,
               "density": [round(c["density"], 4) for c in choices.values()],
               "predicted_cost": [round(c["predicted_cost"], 4) for c in choices.values()],
               "sparse_layers": sum(c["sparse"] for c in choices.values()), "layers": len(choices),
               "seconds": time.time() - started}
        row["density_mean"] = sum(row["density"]) / len(row["density"])
        print({k: v for k, v in row.items() if k not in ("density", "predicted_cost")}, flush=True)
        same = (row["L"], row["alpha"], row["r_row"], row["layer_outputs"])
        rows = [r for r in rows if (r["L"], r["alpha"], r.get("r_row", 0.05), r.get("layer_outputs", "sample")) != same]
        rows.append(row)
        rows.sort(key=lambda r: (r.get("r_row", 0.05), r["L"]))
        info = meta("cpu", "float32", {"model": "SmolLM2-135M-Instruct", "text": "pydoc_data.topics (CPython)",
                                       "tokens_available": ids.shape[1], "trained_positions": trained})
        write_results(args.out, info, rows)
    set_linear_rope(model, 1.0)


if __name__ == "__main__":
    main()
