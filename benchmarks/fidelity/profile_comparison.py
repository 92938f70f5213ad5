"""Compare profiles of the default model on the quickstart task (passkey retrieval) at several
streaming fractions: how many answers equal the dense model's, and the first answer token's KL.

    python benchmarks/fidelity/profile_comparison.py --profiles OLD.safetensors NEW.safetensors \
        [--fractions 0.25 0.5 0.75] [--lengths 2048 3000 4096 6144] [--depths 0.1 0.3 0.5 0.7 0.9] \
        [--out benchmarks/results/profile_comparison]

Prompts come from the evaluation half of the haystack (the profiles were made on the other half),
keys from seed 0, as in the quickstart and the evaluation harness. Each prompt is answered dense once
and then patched with every (profile, fraction). Writes JSON + a PNG (accuracy per fraction).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import meta, write_results  # noqa: E402

from sparse_attn_hf import Profile, SparseConfig  # noqa: E402
from sparse_attn_hf.default_model import load_default_model  # noqa: E402
from sparse_attn_hf.eval.passkey import make_keys, passkey_cells, passkey_prompt  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profiles", nargs="+", required=True)
    p.add_argument("--labels", nargs="+", default=None, help="names of the profiles in the table")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 3000, 4096, 6144])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/profile_comparison")
    args = p.parse_args(argv)
    labels = args.labels or [Path(path).stem for path in args.profiles]
    profiles = [Profile.load(path) for path in args.profiles]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load_default_model(dtype=dtype, device=args.device)
    settings = [(profile, SparseConfig(streaming_fraction=f)) for profile in profiles for f in args.fractions]
    names = [(label, f) for label in labels for f in args.fractions]
    keys = iter(make_keys(len(args.lengths) * len(args.depths), seed=0))
    rows = []
    for length in args.lengths:
        for depth in args.depths:
            prompt = passkey_prompt(tokenizer, length, depth, next(keys))
            for (label, fraction), record in zip(names, passkey_cells(model, tokenizer, prompt, settings)):
                rows.append({"profile": label, "fraction": fraction, **record})
            done = [r for r in rows if r["length"] == length and r["depth"] == depth]
            print(f"{length} x {depth}: dense {done[0]['dense_answer']!r}; "
                  + ", ".join(f"{r['profile']}@{r['fraction']}={'ok' if r['sparse_correct'] else 'x'}" for r in done),
                  flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    info = meta(device, str(dtype).removeprefix("torch."), {
        "profiles": {label: {"path": path, "method": prof.method, "command": prof.command}
                     for label, path, prof in zip(labels, args.profiles, profiles)},
        "task": "passkey (quickstart task), evaluation half of the haystack, keys seed 0",
    })
    path = write_results(Path(args.out), info, rows)
    summary = summarize(rows, labels, args.fractions)
    for line in summary:
        print(line)
    plot(rows, labels, args.fractions, Path(args.out).with_suffix(".png"), info)
    print("wrote", path)


def summarize(rows, labels, fractions) -> list[str]:
    lines = ["profile | " + " | ".join(f"fraction {f}" for f in fractions)]
    for label in labels:
        cells = []
        for f in fractions:
            mine = [r for r in rows if r["profile"] == label and r["fraction"] == f]
            same = sum(r["sparse_correct"] == r["dense_correct"] for r in mine)
            correct = sum(r["sparse_correct"] for r in mine)
            kl = sum(r["kl"] for r in mine) / len(mine)
            cells.append(f"{correct}/{len(mine)} correct, {same} as dense, KL {kl:.3f}")
        lines.append(f"{label} | " + " | ".join(cells))
    dense = {(r["length"], r["depth"]): r["dense_correct"] for r in rows}
    lines.append(f"dense: {sum(dense.values())}/{len(dense)} correct")
    return lines


def plot(rows, labels, fractions, path: Path, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    dense = {(r["length"], r["depth"]): r["dense_correct"] for r in rows}
    for label in labels:
        values = [sum(r["sparse_correct"] for r in rows if r["profile"] == label and r["fraction"] == f) / len(dense)
                  for f in fractions]
        ax.plot(fractions, values, marker="o", label=label)
    ax.axhline(sum(dense.values()) / len(dense), color="gray", linestyle="--", label="dense")
    ax.set_xlabel("streaming fraction")
    ax.set_ylabel("passkey answers correct")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Profiles of the default model, {len(dense)} prompts ({info['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
