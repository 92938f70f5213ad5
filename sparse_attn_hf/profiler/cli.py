"""``python -m sparse_attn_hf.profile``: make a profile for a model, import DuoAttention patterns, report.

    python -m sparse_attn_hf.profile MODEL --out profiles/NAME.safetensors [options]
    python -m sparse_attn_hf.profile import-duo DIR --model MODEL --out profiles/NAME.safetensors
    python -m sparse_attn_hf.profile report PROFILE [--out PNG] [--streaming-fraction F]
    python -m sparse_attn_hf.profile choose-fraction PROFILE --model MODEL --out profiles/NAME.safetensors

MODEL is ``default`` (the embedded SmolLM2-135M-Instruct), a local model directory or a ``.gguf``
file; nothing is downloaded. Making a profile: head scores (``--method duo``, DuoAttention gate
training, the reference; or ``--method stats``, attention statistics, a few forward passes), then a
light SampleAttention sweep (``--no-sweep`` skips it), then the profile file, its report PNG (next
to it) and a summary. Gate training saves a checkpoint next to the output every ``--save-every``
steps; ``--resume`` goes on from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._log import logger
from ..loading import DTYPES, load_config, load_model
from ..profile import Profile
from . import held_out


def _pair(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in tokens (for example 1024,4096), got {text!r}") from None
    return low, high


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one text name")
    return names


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparse_attn_hf.profile",
                                description="Make a sparse-attention profile for a model.",
                                epilog="Other commands: import-duo DIR --model M --out F; report PROFILE [--out PNG]")
    p.add_argument("model", help="'default', a local model directory or a .gguf file")
    p.add_argument("--out", required=True, help="the profile file to write (.safetensors)")
    p.add_argument("--method", choices=["duo", "stats"], default="duo",
                   help="duo: DuoAttention gate training (default); stats: attention statistics (fast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--text", default=None, help="calibration text file (default: the package's haystack, chapters 1-8)")
    p.add_argument("--lengths", type=_pair, default=None,
                   help="MIN,MAX calibration prompt lengths in tokens (default 1024,min(32768, model positions) "
                        "on a GPU, 1024,2048 on a CPU)")
    p.add_argument("--streaming-fraction", type=float, default=None,
                   help="the profile's default fraction (default: the held-out choice with --choose-fraction, else 0.5)")
    p.add_argument("--sink", type=int, default=128, help="streaming heads' sink tokens (training and profile)")
    p.add_argument("--local", type=int, default=256, help="streaming heads' local window (training and profile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="model name stored in the profile (default: from MODEL)")
    g = p.add_argument_group("duo (gate training)")
    g.add_argument("--steps", type=int, default=2000, help="default 2000 (published); minutes on a GPU")
    g.add_argument("--lr", type=float, default=0.02)
    g.add_argument("--l1", type=float, default=0.05, help="weight of the L1 penalty on the gates")
    g.add_argument("--checkpointing", action="store_true", help="activation checkpointing (long contexts)")
    g.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    g.add_argument("--resume", action="store_true", help="go on from OUT's checkpoint")
    g = p.add_argument_group("stats (attention statistics)")
    g.add_argument("--signal", choices=["needle", "window", "combined"], default="needle")
    g.add_argument("--samples", type=int, default=8, help="passkey samples")
    g = p.add_argument_group("SampleAttention sweep")
    g.add_argument("--no-sweep", action="store_true")
    g.add_argument("--alphas", type=_floats, default=(0.8, 0.9, 0.95, 0.98))
    g.add_argument("--rws", type=_floats, default=(0.04, 0.08))
    g.add_argument("--r-rows", type=_floats, default=(0.025,))
    g.add_argument("--sweep-prompts", type=int, default=4, help="passkey prompts per setting")
    g.add_argument("--kl-tolerance", type=float, default=0.02)
    g.add_argument("--text-tokens", type=int, default=2048, help="held-out tokens for the KL")
    g.add_argument("--dense-below", type=int, default=16384,
                   help="kept when the crossover is not measured (CPU, or no length faster)")
    g = p.add_argument_group("default fraction chosen on held-out text (sparse_attn_hf.profiler.held_out)")
    g.add_argument("--choose-fraction", action="store_true",
                   help="measure agreement with dense on held-out choosing texts and take the largest safe fraction")
    g.add_argument("--fractions", type=_floats, default=held_out.FRACTIONS,
                   help="candidate fractions (the rule also needs each fraction + 0.05)")
    g.add_argument("--choice-lengths", type=_ints, default=held_out.LENGTHS, help="prompt lengths of the cells")
    g.add_argument("--choosing-texts", type=_names, default=held_out.CHOOSING_TEXTS,
                   help="held-out texts of different kinds the fraction is chosen on (eval --haystack names, "
                        "comma-separated; every one gets needle, passkey and late-passkey cells)")
    g.add_argument("--allow-unchecked-fraction", action="store_true",
                   help="write a default fraction the held-out rule did not pass")
    g.add_argument("--crossover-lengths", type=_ints, default=None,
                   help="lengths timed on a GPU for the dense-below crossover (default: powers of two from 4096 "
                        "up to the model's positions, at most 131072)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if argv and argv[0] == "import-duo":
            _import_duo(argv[1:])
        elif argv and argv[0] == "report":
            _report(argv[1:])
        elif argv and argv[0] == "choose-fraction":
            _rechoose(argv[1:])
        elif argv and argv[0] == "calibrate":
            _calibrate(argv[1:])
        else:
            make_profile(profile_parser().parse_args(argv), argv)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------------------ making
def _checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def _save_checkpoint(path: Path, state: dict, fingerprint: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: state[k].contiguous() for k in ("gates", "exp_avg", "exp_avg_sq")}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(state["step"]), "settings": fingerprint})
    tmp.replace(path)


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    if metadata.get("settings") != fingerprint:
        raise ValueError(f"the checkpoint {path} was made with other settings; delete it or run without --resume.")
    state["step"] = int(metadata["step"])
    return state


def make_profile(args, argv: list[str]) -> Profile:
    from ..models import family_for
    from ..profile.attention_stats import SIGNALS, stats_scores
    from .calibration import Calibration
    from .gates import GateSettings, train_gates
    from .report import report_text, save_report
    from .sweep import SweepSettings, measure_dense_below, run_sweep, to_json

    started = time.time()
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end with .safetensors.")
    try:  # before any work: a run must not end in an unwritable path
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot write --out {out}: {error}") from None
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path ending in .safetensors.")
    if args.streaming_fraction is not None and not 0.0 <= args.streaming_fraction <= 1.0:
        raise ValueError(f"--streaming-fraction {args.streaming_fraction} is outside [0, 1].")
    model, tokenizer, name = load_model(args.model, args.device, args.dtype)
    family_for(model)  # an unsupported model fails here, before any work
    config = model.config.get_text_config(decoder=True)
    positions = getattr(config, "max_position_embeddings", None) or 32768
    gpu = model.device.type == "cuda"
    lengths = args.lengths or ((1024, min(32768, positions)) if gpu else (1024, 2048))
    calibration = (Calibration.from_file(tokenizer, args.text, held_out=args.text_tokens) if args.text
                   else Calibration.from_text(tokenizer, held_out=args.text_tokens))
    command = "python -m sparse_attn_hf.profile " + shlex.join(argv)
    print(f"profiling {name} ({config.num_hidden_layers} layers x "
          f"{getattr(config, 'num_key_value_heads', config.num_attention_heads)} KV heads) on {model.device}, "
          f"{model.dtype}; method {args.method}; calibration {calibration.description}, {len(calibration.tokens)} "
          f"tokens; prompt lengths {lengths[0]}-{lengths[1]}", flush=True)

    if args.method == "duo":
        settings = GateSettings(steps=args.steps, lr=args.lr, l1=args.l1, sink=args.sink, local=args.local,
                                lengths=lengths, seed=args.seed, checkpointing=args.checkpointing)
        fingerprint = json.dumps({**dataclasses.asdict(settings), "model": name, "text": calibration.description,
                                  "held_out": args.text_tokens}, sort_keys=True)
        checkpoint = _checkpoint_path(out)
        resume = _load_checkpoint(checkpoint, fingerprint) if args.resume else None
        if resume is not None:
            print(f"resuming from step {resume['step']} ({checkpoint})")

        def on_step(step, state):
            if step % args.save_every == 0 or step == settings.steps:
                out.parent.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(checkpoint, state, fingerprint)

        with tqdm(total=settings.steps, initial=resume["step"] if resume else 0, desc="gate training") as bar:
            result = train_gates(model, calibration, settings, progress=bar, resume=resume, on_step=on_step)
        scores = result.gates
        method = (f"DuoAttention gates: {settings.steps} steps, lr {settings.lr}, l1 {settings.l1}, sink "
                  f"{settings.sink} + local {settings.local}, seed {settings.seed}")
        samples_note = f"one passkey sample per step, lengths {lengths[0]}-{lengths[1]}"
    else:
        samples = calibration.samples(args.samples, lengths, seed=args.seed)
        with tqdm(total=len(samples), desc="attention statistics") as bar:
            scores = stats_scores(model, calibration, samples, args.sink, args.local, args.signal, progress=bar)
        method = f"attention statistics: {SIGNALS[args.signal]} per KV head (most demanding query head of its group)"
        samples_note = f"{len(samples)} passkey samples, lengths {lengths[0]}-{lengths[1]}, seed {args.seed}"
        checkpoint = None

    profile = Profile.from_scores(
        model, scores, model_name=args.name or name,
        streaming_fraction=0.5 if args.streaming_fraction is None else args.streaming_fraction,
        sink_size=args.sink, local_size=args.local, method=method, dense_below=args.dense_below,
        calibration=f"{calibration.description}: {samples_note}", command=command,
    )

    if not args.no_sweep:
        sweep_settings = SweepSettings(alphas=args.alphas, rws=args.rws, r_rows=args.r_rows,
                                       kl_tolerance=args.kl_tolerance, text_tokens=args.text_tokens)
        prompts = [s.input_ids[:, : s.prompt_tokens] for s in
                   calibration.samples(args.sweep_prompts, lengths, seed=args.seed + 1)]
        grid = len(args.alphas) * len(args.rws) * len(args.r_rows)
        with tqdm(total=grid, desc="SampleAttention sweep") as bar:
            sweep = run_sweep(model, profile, prompts, calibration.held_out_ids(args.text_tokens), sweep_settings,
                              progress=bar)
        chosen = sweep["chosen"] or {"alpha": 1.0}
        dense_below = args.dense_below
        crossover_lengths = args.crossover_lengths or tuple(
            2 ** k for k in range(12, 18) if 2 ** k <= min(positions, 131072))
        if gpu and sweep["chosen"] is not None and crossover_lengths:
            timing = measure_dense_below(model, profile, sweep["chosen"], calibration.tokens, list(crossover_lengths))
            sweep["dense_below"] = timing
            dense_below = timing["crossover"] or max(crossover_lengths) * 2
        else:
            why = ("the crossover is a GPU timing" if not gpu else "SampleAttention is off" if sweep["chosen"] is None
                   else "no length to time (give --crossover-lengths)")
            sweep["dense_below"] = {"measured": False, "kept": dense_below, "why": why}
        profile = dataclasses.replace(profile, **chosen, dense_below=dense_below, sweep=to_json(sweep))

    if args.choose_fraction:
        profile = _choose_fraction(args, model, tokenizer, profile)
    elif args.streaming_fraction is None:
        print("the default fraction 0.5 is not checked on held-out text (--choose-fraction does it)")

    path = profile.save(out)
    if checkpoint is not None and checkpoint.is_file():
        checkpoint.unlink()
    picture = None
    try:
        picture = save_report(profile, out.with_suffix(".png"))
    except ImportError as error:
        logger.log(logging.WARNING, "no report picture: %s", error)
    print()
    print(report_text(profile))
    print(f"\nwrote {path}" + (f" and {picture}" if picture else "") + f" in {time.time() - started:.0f} s")
    return profile


def _choose_fraction(args, model, tokenizer, profile: Profile) -> Profile:
    """Measure the candidate fractions on the held-out choosing text, record table and choice, and refuse a
    default above the choice unless --allow-unchecked-fraction."""
    from ..eval.harness import load_haystack

    texts = [load_haystack(name).text for name in args.choosing_texts]
    cells = []
    for text in texts:  # every genre: passkeys and needles at 5 depths, and passkeys hidden late
        cells += held_out.held_out_cells(tokenizer, text, lengths=args.choice_lengths)
        late = [length for length in held_out.LATE_LENGTHS if length <= max(args.choice_lengths)]
        cells += held_out.late_key_cells(tokenizer, text, lengths=late) if late else []
    step = held_out.STEP
    fractions = sorted(set(args.fractions) | {round(f + step, 2) for f in args.fractions if f + step <= 1.0})
    text_ids = tokenizer(texts[0], return_tensors="pt", add_special_tokens=False).input_ids[:, : args.text_tokens]
    with tqdm(total=len(fractions), desc=f"held-out fractions ({len(cells)} cells)") as bar:
        rows = held_out.measure(model, tokenizer, profile, cells, fractions, text_ids, progress=bar)
    choice = held_out.choose_fraction(rows)
    for row in choice["rows"]:
        print(f"fraction {row['fraction']:.2f}: lost {row['lost']} of {row['dense_correct']} dense-correct cells, "
              f"first-token KL {row['first_token_kl']:.4f}, text KL {row['text_kl']:.4f}")
    fraction = args.streaming_fraction if args.streaming_fraction is not None else choice["fraction"]
    if fraction is None:
        if not args.allow_unchecked_fraction:
            raise ValueError(f"no candidate fraction passed the held-out rule ({choice['rule']}); give lower "
                             f"--fractions, or --streaming-fraction F with {held_out.ALLOW_FLAG}.")
        fraction = profile.streaming_fraction
    held_out.check_default(fraction, choice, allow=args.allow_unchecked_fraction)
    print(f"default streaming fraction {fraction} (held-out choice: {choice['fraction']})")
    choice_json = held_out.to_metadata(choice, " + ".join(args.choosing_texts) + " (with late passkeys)")
    return dataclasses.replace(profile, streaming_fraction=fraction, fraction_choice=choice_json)


# ---------------------------------------------------------------------- other commands
def _import_duo(argv: list[str]) -> None:
    from .duo_import import import_duo

    p = argparse.ArgumentParser(prog="python -m sparse_attn_hf.profile import-duo",
                                description="Convert a DuoAttention pattern folder into a profile.")
    p.add_argument("folder", help="the folder with full_attention_heads.tsv (and config.json)")
    p.add_argument("--model", required=True, help="'default', a model directory (config.json) or a .gguf file")
    p.add_argument("--out", required=True)
    p.add_argument("--streaming-fraction", type=float, default=0.5)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    settings = {"streaming_fraction": args.streaming_fraction,
                "command": "python -m sparse_attn_hf.profile " + shlex.join(["import-duo", *argv])}
    if args.name:
        settings["model_name"] = args.name
    profile = import_duo(args.folder, load_config(args.model), **settings)
    path = profile.save(args.out)
    print(profile.describe())
    print(f"wrote {path}")


def _calibrate(argv: list[str]) -> None:
    from ..profile.first_use import cache_path, calibrate

    p = argparse.ArgumentParser(prog="python -m sparse_attn_hf.profile calibrate",
                                description="Calibrate a profile from attention statistics (what patch_model does on "
                                            "first use for a model without a shipped profile), with a progress bar.")
    p.add_argument("--model", required=True, help="'default', a model directory (config.json) or a .gguf file")
    p.add_argument("--out", default=None, help="profile file (default: the cache patch_model reads)")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--length", type=int, default=None, help="probe length (default: 2048 on CPU, 4096 on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    p.add_argument("--streaming-fraction", type=float, default=None,
                   help="the profile's default fraction (default: 0, the held-out rule's choice for statistics; "
                        "choose-fraction picks one on held-out text)")
    args = p.parse_args(argv)
    model, _, _ = load_model(args.model, args.device, args.dtype, tokenizer=False)  # the probes need none
    extra = {} if args.streaming_fraction is None else {"streaming_fraction": args.streaming_fraction}
    profile = calibrate(model, length=args.length, count=args.probes, progress=True,
                        command="python -m sparse_attn_hf.profile " + shlex.join(["calibrate", *argv]), **extra)
    out = Path(args.out) if args.out else cache_path(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = profile.save(out)
    print(profile.describe())
    print(f"wrote {path} ({profile.seconds:.0f} s)")


def _rechoose(argv: list[str]) -> None:
    """An existing profile's default fraction chosen anew on held-out text (its head scores kept)."""
    p = argparse.ArgumentParser(prog="python -m sparse_attn_hf.profile choose-fraction",
                                description="Choose a profile's default streaming fraction on held-out text.")
    p.add_argument("profile")
    p.add_argument("--model", required=True, help="'default', a local model directory or a .gguf file")
    p.add_argument("--out", required=True, help="the profile file to write (.safetensors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    p.add_argument("--streaming-fraction", type=float, default=None)
    p.add_argument("--fractions", type=_floats, default=held_out.FRACTIONS)
    p.add_argument("--choice-lengths", type=_ints, default=held_out.LENGTHS)
    p.add_argument("--choosing-texts", type=_names, default=held_out.CHOOSING_TEXTS,
                   help="held-out texts the fraction is chosen on (eval --haystack names), comma-separated")
    p.add_argument("--text-tokens", type=int, default=2048, help="held-out tokens for the next-token KL")
    p.add_argument("--allow-unchecked-fraction", action="store_true")
    args = p.parse_args(argv)
    model, tokenizer, _ = load_model(args.model, args.device, args.dtype)
    profile = Profile.load(args.profile)
    profile.validate_for(model)
    profile = _choose_fraction(args, model, tokenizer, profile)
    command = "python -m sparse_attn_hf.profile " + shlex.join(["choose-fraction", *argv])
    profile = dataclasses.replace(profile, command=f"{profile.command}; then {command}")
    print(f"wrote {profile.save(args.out)}")


def _report(argv: list[str]) -> None:
    from .report import report_text, save_report

    p = argparse.ArgumentParser(prog="python -m sparse_attn_hf.profile report",
                                description="Draw a profile's head scores and print its settings.")
    p.add_argument("profile")
    p.add_argument("--out", default=None, help="PNG path (default: the profile's path with .png)")
    p.add_argument("--streaming-fraction", type=float, default=None)
    args = p.parse_args(argv)
    profile = Profile.load(args.profile)
    print(report_text(profile, args.streaming_fraction))
    picture = save_report(profile, args.out or Path(args.profile).with_suffix(".png"), args.streaming_fraction)
    print(f"wrote {picture}")
