"""A profile calibrated on first use against the shipped gate-trained one, on the default model (CPU).

    python benchmarks/fidelity/calibration_quality.py [--count 8] [--length 2048]

Calibrates the default model as ``patch_model`` would with no shipped profile
(``sparse_attn_hf.profile.first_use.calibrate``), times it, and compares its head scores with the shipped
profile's DuoAttention gates: the rank correlation of the scores, and at the shipped streaming fraction how many of
the heads the gates keep dense the calibrated profile keeps dense too. Writes
benchmarks/results/calibration_quality.json. Answers on held-out text: ``benchmarks/fidelity/heldout_fidelity.py
--profile PATH`` with the calibrated profile saved by this script (``--save``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

from sparse_attn_hf.default_model import load_default_model  # noqa: E402
from sparse_attn_hf.profile import find_profile  # noqa: E402
from sparse_attn_hf.profile.first_use import calibrate  # noqa: E402



def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.flatten().argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--save", type=Path, default=None, help="write the calibrated profile here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, _ = load_default_model()
    shipped = find_profile(model)
    started = time.perf_counter()
    calibrated = calibrate(model, length=args.length, count=args.count)
    seconds = time.perf_counter() - started
    if args.save is not None:
        calibrated.save(args.save)
    fraction = shipped.streaming_fraction
    dense_shipped = ~shipped.streaming_heads(fraction)
    dense_calibrated = ~calibrated.streaming_heads(fraction)
    kept = int((dense_shipped & dense_calibrated).sum())
    row = {"count": args.count, "length": args.length, "seconds": seconds, "streaming_fraction": fraction,
           "spearman": spearman(shipped.head_score, calibrated.head_score),
           "dense_heads_shipped": int(dense_shipped.sum()), "dense_heads_also_dense_calibrated": kept,
           "chance": float(dense_shipped.sum()) * float(dense_calibrated.sum()) / dense_shipped.numel()}
    print(row)
    info = meta(device="cpu", dtype=str(model.dtype), extra={"model": "SmolLM2-135M-Instruct",
                                                            "threads": torch.get_num_threads()})
    write_results(RESULTS / "calibration_quality", info, [row])


if __name__ == "__main__":
    main()
