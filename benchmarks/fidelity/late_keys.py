"""Late passkeys on held-out text of three genres: the default model with its shipped profile against dense (CPU).

    python benchmarks/fidelity/late_keys.py                                   # the standing rows: shipped settings
    python benchmarks/fidelity/late_keys.py --variants shipped,local512 --texts alice --lengths 4096
    python benchmarks/fidelity/late_keys.py --heads --texts alice --lengths 4096 --depths 0.9,0.95 --seeds 0,1

Cells: a passkey (``sparse_attn_hf.eval.passkey``'s needle, question and answer prefix) hidden at depths 0.7, 0.8,
0.9 and 0.95 of 2K and 4K prompts, five key seeds (each seed its own key and its own stretch of filler). At depth
0.9 of a 4K prompt the key sits about 400 tokens before the question: past the default model's local window (256)
of its streaming heads. A cell is *lost* when dense attention answers it right and the patched model does not.
Texts, none used to fit the profile or choose its fraction: ``reporting`` (CPython's reference manual, its
reporting half), ``alice`` and ``lcet10`` (public-domain prose, ``sparse_attn_hf.eval.prose``). Per text and
variant also the mean next-token KL over the first 4096 tokens of the text.

Variants (``SparseConfig`` overrides of the shipped profile's settings): ``shipped`` (none), ``localN`` (streaming
heads' local window N tokens), ``fractionF`` (streaming fraction F), ``dense`` (fraction 0, the control).

``--heads``: for each cell, dense attention's share of the question's last token on the key's tokens, per KV head
(mean over its query heads), written beside the rows: which heads would carry the key, and whether they stream.

Writes benchmarks/results/late_keys.json (rows of other texts and variants kept) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_attn_hf import SparseConfig, patched
from sparse_attn_hf.default_model import load_default_model
from sparse_attn_hf.eval.heldout import heldout_text
from sparse_attn_hf.eval.prose import prose_text
from sparse_attn_hf.profile import find_profile, resolve_profile
from sparse_attn_hf.profiler.held_out import late_key_prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks.common
from benchmarks.common import RESULTS, meta, write_results  # noqa: E402

OUT = RESULTS / "late_keys"
TEXTS = {"reporting": lambda: heldout_text("reporting"), "alice": lambda: prose_text("alice"),
         "lcet10": lambda: prose_text("lcet10")}
NEW_TOKENS = 8


def variant_settings(name: str) -> dict:
    if name == "shipped":
        return {}
    if name == "dense":
        return {"streaming_fraction": 0.0}
    if name.startswith("local"):
        return {"local_size": int(name[5:])}
    if name.startswith("fraction"):
        return {"streaming_fraction": float(name[8:])}
    raise ValueError(f"unknown variant {name!r}: shipped, dense, localN or fractionF.")


@torch.no_grad()
def answer(model, tokenizer, ids) -> tuple[str, torch.Tensor]:
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    return (tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True),
            F.log_softmax(out.logits[0][0].float(), dim=-1))


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
def head_mass(model, cell: dict) -> list[list[float]]:
    """Dense attention's share of the prompt's last query on the key's tokens: [layer][KV head] (mean over the KV
    head's query heads), from eager attention weights, one layer at a time."""
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    span = cell["span"]
    shares = []

    def keep(module, args, output):
        weights = output[1]  # [1, heads, q, k]
        last = weights[0, :, -1, span].sum(-1).float()
        shares.append(last.view(config.num_key_value_heads, groups).mean(-1).tolist())
        return (output[0], None)

    previous = config._attn_implementation
    model.set_attn_implementation("eager")
    hooks = [layer.self_attn.register_forward_hook(keep) for layer in model.model.layers]
    try:
        model(cell["ids"], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.set_attn_implementation(previous)
    return shares


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=lambda s: s.split(","), default=list(TEXTS))
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=["shipped"],
                        help="settings to compare with dense ('' for none: dense answers and --heads only)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096])
    parser.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3, 4])
    parser.add_argument("--text-tokens", type=int, default=4096)
    parser.add_argument("--heads", action="store_true", help="dense attention's mass on the key, per KV head")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a profile file in place of the shipped one (rows named 'PROFILE_STEM: variant')")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    profile = find_profile(model) if args.profile is None else resolve_profile(model, str(args.profile))
    prefix = "" if args.profile is None else f"{args.profile.stem}: "
    path = args.out.with_suffix(".json")
    earlier = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    rows = []
    heads = {}

    shipped = find_profile(model)
    started = meta("cpu", "float32", {"model": "SmolLM2-135M-Instruct", "profile": str(shipped.source),
                                      "profile_settings": {k: getattr(shipped, k) for k in (
                                          "streaming_fraction", "sink_size", "local_size", "token_budget")},
                                      "new_tokens": NEW_TOKENS})  # the commit the run started from

    def save():
        mine = {_key(r) for r in rows}
        info = dict(started)
        runs = dict(earlier["meta"].get("runs", {}))
        runs[f"{','.join(args.texts)}: {','.join(args.variants)}"] = {k: info[k] for k in ("commit", "date", "command")}
        info["runs"] = runs
        if heads:
            info["head_mass"] = {**earlier["meta"].get("head_mass", {}), **heads}
        elif "head_mass" in earlier["meta"]:
            info["head_mass"] = earlier["meta"]["head_mass"]
        write_results(args.out, info, [r for r in earlier["rows"] if _key(r) not in mine] + rows)
        plot(path)

    for name in args.texts:
        text = TEXTS[name]()
        text_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : args.text_tokens]
        grid = late_key_prompts(tokenizer, text, lengths=args.lengths, depths=args.depths, seeds=args.seeds)
        clock = time.time()
        dense = [answer(model, tokenizer, c["ids"]) for c in grid]
        right = [c["key"] in d[0] for c, d in zip(grid, dense)]
        dense_text = F.log_softmax(model(text_ids, use_cache=False).logits[0].float(), dim=-1)
        if args.heads:
            streaming = profile.streaming_heads(profile.streaming_fraction)
            for cell in grid:
                mass = torch.tensor(head_mass(model, cell))
                order = mass.flatten().argsort(descending=True).tolist()
                kv = mass.shape[1]
                heads[f"{name} L{cell['L']} d{cell['depth']} s{cell['seed']}"] = {
                    "key_distance": cell["key_distance"], "dense_correct": cell["key"] in dense[grid.index(cell)][0],
                    "mass": [[round(x, 4) for x in layer] for layer in mass.tolist()], "streaming": streaming.tolist(),
                    # the heads that read the key most, and how much of all heads' reading falls on streaming ones
                    "top": [(i // kv, i % kv, round(float(mass.flatten()[i]), 4), bool(streaming.flatten()[i]))
                            for i in order[:6]],
                    "streaming_share": float(mass[streaming].sum() / mass.sum()),
                    "first_streaming_rank": next(r for r, i in enumerate(order) if streaming.flatten()[i])}
        for variant in args.variants:
            with patched(model, profile, SparseConfig(**variant_settings(variant))):
                got = [answer(model, tokenizer, c["ids"]) for c in grid]
                text_kl = kl(dense_text, F.log_softmax(model(text_ids, use_cache=False).logits[0].float(), dim=-1))
            for length in args.lengths:
                index = [i for i, c in enumerate(grid) if c["L"] == length]
                lost = [i for i in index if right[i] and grid[i]["key"] not in got[i][0]]
                rows.append({
                    "text": name, "variant": prefix + variant, "settings": variant_settings(variant), "L": length,
                    "cells": len(index), "dense_correct": sum(right[i] for i in index), "lost": len(lost),
                    "gained": sum(not right[i] and grid[i]["key"] in got[i][0] for i in index),
                    "lost_cells": [{"depth": grid[i]["depth"], "seed": grid[i]["seed"],
                                    "key_distance": grid[i]["key_distance"], "answer": got[i][0].strip()}
                                   for i in lost],
                    "first_token_kl": sum(kl(dense[i][1], got[i][1]) for i in index) / len(index),
                    "text_kl": text_kl, "depths": args.depths, "seeds": args.seeds,
                    "seconds": time.time() - clock})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "lost_cells"}), flush=True)
            save()
    if not args.variants:
        save()


def _key(row: dict) -> tuple:
    return row["text"], row["variant"], row["L"]


def plot(path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = json.loads(path.read_text())["rows"]
    labels = sorted({(r["variant"], r["L"]) for r in rows}, key=lambda v: (v[0] != "shipped", v[0], v[1]))
    texts = sorted({r["text"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 3.5))
    width = 0.8 / max(len(texts), 1)
    for t, text in enumerate(texts):
        values = []
        for variant, length in labels:
            row = next((r for r in rows if (r["text"], r["variant"], r["L"]) == (text, variant, length)), None)
            values.append(row["lost"] / row["dense_correct"] if row and row["dense_correct"] else 0)
        ax.bar([i + t * width for i in range(len(labels))], values, width, label=text)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], [f"{v}\n{n}" for v, n in labels], fontsize=7)
    ax.set_ylabel("share of dense-correct cells lost")
    ax.set_title("Late passkeys (depths 0.7-0.95), default model, CPU", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
