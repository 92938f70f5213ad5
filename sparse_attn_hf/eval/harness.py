"""The evaluation harness: needle / passkey / ppl, dense against sparse on the same prompts.

``python -m sparse_attn_hf.eval needle|passkey|ppl --model M ...`` (the command line: eval/cli.py), or
from Python with a loaded model::

    evaluate("needle", model, tokenizer, lengths=[512, 1024], out="results")

Writes ``{out}/eval_{task}.json`` (``{"meta": {...}, "rows": [...]}``) and ``{out}/eval_{task}.png``
and returns them with a one-line summary.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from ..config import SparseConfig
from ..profile import Profile, resolve_profile
from . import haystack as default_haystack
from .heatmap import perplexity_chart, retrieval_heatmap
from .needle import DEFAULT_NEEDLE, MAX_NEW_TOKENS, needle_cells, needle_prompt
from .passkey import _OVERHEAD, ANSWER_PREFIX, NEEDLE, QUESTION, PasskeyPrompt, make_keys, passkey_cells
from .perplexity import perplexity_rows
from .prompts import HaystackTooShort, hide

TASKS = ("needle", "passkey", "ppl")
DEFAULT_LENGTHS = {"needle": [512, 1024, 2048], "passkey": [512, 1024, 2048], "ppl": [2048]}
DEFAULT_DEPTHS = [0.1, 0.5, 0.9]
NEW_TOKENS = {"needle": MAX_NEW_TOKENS, "passkey": 8, "ppl": 0}  # passkey: passkey_cells' answer length


# ----------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class Haystack:
    text: str
    source: str  # what it is, for the JSON
    sha256: str


HELDOUT = ("heldout", "heldout:reporting", "heldout:choosing")


def load_haystack(path: str | Path | None = None) -> Haystack:
    """The text file ``path`` (UTF-8; undecodable bytes replaced), the package's story (its evaluation half;
    the text the shipped profile was fitted on) when None, or held-out text: ``"heldout"`` (its reporting
    half) or ``"heldout:choosing"`` (``sparse_attn_hf.eval.heldout``), or public-domain prose of other genres:
    ``"prose:alice"``, ``"prose:lcet10"`` (``sparse_attn_hf.eval.prose``)."""
    if path is None:
        return Haystack(default_haystack.haystack_text("evaluation"), "default story, evaluation half "
                        "(sparse_attn_hf/eval/data/haystack.txt)", default_haystack.haystack_sha256())
    if str(path) in HELDOUT:
        from .heldout import heldout_sha256, heldout_text

        part = "reporting" if str(path) == "heldout" else str(path).split(":")[1]
        return Haystack(heldout_text(part), f"held-out text, {part} half (CPython's reference manual, "
                        "sparse_attn_hf/eval/heldout.py)", heldout_sha256(part))
    if str(path).startswith("prose:"):
        from .prose import prose_sha256, prose_text

        name = str(path).split(":", 1)[1]
        return Haystack(prose_text(name), f"public-domain prose {name!r} (sparse_attn_hf/eval/prose.py)",
                        prose_sha256(name))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--haystack {str(path)!r}: no such file.")
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"--haystack {str(path)!r} is empty: pass a text file with a long text.")
    return Haystack(text, str(path), hashlib.sha256(data).hexdigest())


# ----------------------------------------------------------------------------- prompts
def _max_positions(model) -> int | None:
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def build_inputs(task: str, tokenizer, model, haystack: Haystack, lengths, depths, seed: int = 0) -> list:
    """Every prompt (needle, passkey) or text (ppl) of the run, checked against the haystack and the
    model's maximum positions before anything is computed; ``ValueError`` names the bad value."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}.")
    if not lengths:
        raise ValueError("give at least one length.")
    for length in lengths:
        if length < 2:
            raise ValueError(f"--lengths {length}: a length must be at least 2 tokens.")
    max_pos = _max_positions(model)
    if task == "ppl":
        ids = tokenizer(haystack.text, return_tensors="pt", add_special_tokens=False).input_ids
        inputs = []
        for length in lengths:
            if length > ids.shape[1]:
                raise ValueError(f"--lengths {length}: the haystack ({haystack.source}) has only {ids.shape[1]} "
                                 "tokens; pass a longer --haystack or shorter --lengths.")
            if max_pos is not None and length > max_pos:
                raise ValueError(f"--lengths {length} exceeds the model's max_position_embeddings ({max_pos}).")
            inputs.append(ids[:, :length])
        return inputs
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"--depths {depth}: a depth must lie in [0, 1] (0 = start of the haystack, 1 = end).")
    if not depths:
        raise ValueError("give at least one depth.")
    cells = [(length, depth) for length in lengths for depth in depths]
    keys = make_keys(len(cells), seed=seed)
    prompts = []
    for (length, depth), key in zip(cells, keys):
        if max_pos is not None and length + NEW_TOKENS[task] > max_pos:
            raise ValueError(f"--lengths {length} (+ {NEW_TOKENS[task]} answer tokens) exceeds the model's "
                             f"max_position_embeddings ({max_pos}).")
        try:
            if task == "needle":
                prompt = needle_prompt(tokenizer, haystack.text, length, depth)
            else:  # the passkey prompt of eval/passkey.py, on any haystack
                needle = NEEDLE.format(key=key)
                ids, span = hide(tokenizer, haystack.text, length, depth, needle, QUESTION, ANSWER_PREFIX,
                                 overhead=_OVERHEAD)
                prompt = PasskeyPrompt(length=length, depth=depth, key=key, input_ids=ids, needle=span)
        except HaystackTooShort as error:
            raise ValueError(f"--lengths {length}: {error} Use a longer --haystack ({haystack.source}) or shorter "
                             "--lengths.") from None
        except ValueError as error:
            raise ValueError(f"--lengths {length}: {error}") from None
        if max_pos is not None and prompt.tokens + NEW_TOKENS[task] > max_pos:
            raise ValueError(f"--lengths {length}: the prompt has {prompt.tokens} tokens (+ {NEW_TOKENS[task]} answer "
                             f"tokens), more than the model's max_position_embeddings ({max_pos}).")
        prompts.append(prompt)
    return prompts


# ----------------------------------------------------------------------------- running
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Prepared:
    """A checked run: everything ``run`` needs, built before any model call."""

    task: str
    model: object
    tokenizer: object
    profile: Profile
    config: SparseConfig | None  # as given (patched() resolves it against the profile)
    settings: SparseConfig  # resolved
    haystack: Haystack
    lengths: list
    depths: list | None
    seed: int
    inputs: list  # PasskeyPrompt per cell, or input_ids [1, n] per text
    model_name: str
    model_path: str | None


def prepare(task: str, model, tokenizer, *, lengths=None, depths=None, haystack: str | Path | Haystack | None = None,
            profile=None, config: SparseConfig | None = None, seed: int = 0, model_name: str | None = None,
            model_path: str | None = None) -> Prepared:
    """Check every argument and build every prompt; ``ValueError`` / ``FileNotFoundError`` name the problem."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}.")
    lengths = list(lengths or DEFAULT_LENGTHS[task])
    depths = list(DEFAULT_DEPTHS if depths is None else depths) if task != "ppl" else None
    hay = haystack if isinstance(haystack, Haystack) else load_haystack(haystack)
    try:
        profile = resolve_profile(model, profile)
    except ValueError as error:
        raise ValueError(f"{error} On the command line: --profile PATH.") if profile is None else error from None
    settings = (config or SparseConfig()).resolve(profile)  # validates the combination now
    inputs = build_inputs(task, tokenizer, model, hay, lengths, depths, seed)
    model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return Prepared(task, model, tokenizer, profile, config, settings, hay, lengths, depths, seed, inputs,
                    model_name, model_path)


def evaluate(task: str, model, tokenizer, *, out: str | Path | None = None, log=_log, **options) -> dict:
    """Run ``task`` dense (the model as given) and sparse (patched with ``profile``/``config``) on the same
    prompts. Options: ``lengths``, ``depths``, ``haystack`` (a path; None: the package's story),
    ``profile`` (None: the shipped one, a path or a Profile), ``config`` (SparseConfig), ``seed``,
    ``model_name``. ``out``: a folder for ``eval_{task}.json`` and ``.png`` (None: nothing written).
    Returns ``{"meta", "rows", "summary", "json", "png", "figure"}``; ``summary`` is the one-line result."""
    return run(prepare(task, model, tokenizer, **options), out=out, log=log)


def run(job: Prepared, out: str | Path | None = None, log=_log, command: str | None = None) -> dict:
    """Run a prepared job (see :func:`evaluate`); ``command`` is recorded in the JSON."""
    started = time.time()
    task, model, tokenizer, profile, settings = job.task, job.model, job.tokenizer, job.profile, job.settings
    labels = profile.streaming_heads(settings.streaming_fraction)
    log(f"{task}: {job.model_name}, {len(job.inputs)} {'texts' if task == 'ppl' else 'prompts'}, "
        f"{int(labels.sum())}/{profile.head_score.numel()} KV heads of the covered layers stream")
    rows = []
    setting = [(profile, job.config)]
    for i, item in enumerate(job.inputs, 1):
        t0 = time.time()
        if task == "ppl":
            (row,) = perplexity_rows(model, item, setting)
            log(f"[ppl {i}/{len(job.inputs)}] {row['tokens']} tokens: perplexity dense {row['dense_ppl']:.3f}, "
                f"sparse {row['sparse_ppl']:.3f}, top-1 agreement {row['top1_agreement']:.3f}, mean KL "
                f"{row['mean_kl']:.4f} ({time.time() - t0:.0f} s)")
        else:
            if task == "needle":
                (row,) = needle_cells(model, tokenizer, item, setting, DEFAULT_NEEDLE)
            else:
                (row,) = passkey_cells(model, tokenizer, item, setting)
                row["dense_score"], row["sparse_score"] = float(row["dense_correct"]), float(row["sparse_correct"])
            log(f"[{task} {i}/{len(job.inputs)}] length {row['length']} depth {row['depth']:g}: dense "
                f"{row['dense_answer']!r} ({row['dense_score']:.2g}), sparse {row['sparse_answer']!r} "
                f"({row['sparse_score']:.2g}) ({time.time() - t0:.0f} s); sparse ran: {row['ran']}")
        rows.append(row)

    info = run_meta(job, time.time() - started, command)
    title = (f"{job.model_name}, {task}: dense vs sparse ({info['streaming_kv_heads']} KV heads streaming, "
             f"sink {settings.sink_size}, local {settings.local_size}, budget {settings.token_budget}, "
             f"shortlist {settings.shortlist})")
    figure = perplexity_chart(rows, title=title) if task == "ppl" else retrieval_heatmap(rows, title=title)
    json_path = png_path = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        json_path, png_path = out / f"eval_{task}.json", out / f"eval_{task}.png"
        json_path.write_text(json.dumps({"meta": info, "rows": rows}, indent=1) + "\n")
        figure.savefig(png_path, dpi=110, bbox_inches="tight")
    line = summary_line(task, rows, job.model_name, info)
    if json_path is not None:
        line += f" | wrote {json_path}, {png_path}"
    return {"meta": info, "rows": rows, "summary": line, "json": json_path, "png": png_path, "figure": figure}


def summary_line(task: str, rows: list[dict], model_name: str, info: dict) -> str:
    head = f"{task} | {model_name} | {info['streaming_kv_heads']} KV heads streaming"
    if task == "ppl":
        parts = [f"{r['tokens']} tokens: perplexity dense {r['dense_ppl']:.3f}, sparse {r['sparse_ppl']:.3f} "
                 f"({100 * (r['ppl_ratio'] - 1):+.1f}%), top-1 agreement {r['top1_agreement']:.3f}, "
                 f"mean KL {r['mean_kl']:.4f}" for r in rows]
        return " | ".join([head, *parts])
    n = len(rows)
    dense, sparse = sum(r["dense_correct"] for r in rows), sum(r["sparse_correct"] for r in rows)
    same = sum(r["dense_answer"] == r["sparse_answer"] for r in rows)
    kl = sum(r["kl"] for r in rows) / n
    return (f"{head} | {n} prompts | correct: dense {dense}/{n}, sparse {sparse}/{n} | same answer {same}/{n} | "
            f"mean first-token KL {kl:.4f}")


# ----------------------------------------------------------------------------- records
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def source_commit() -> str | None:
    """The commit of a source checkout holding this package (read from .git, no git process), or
    $SPARSE_ATTN_HF_COMMIT; None when neither is there."""
    if os.environ.get("SPARSE_ATTN_HF_COMMIT"):
        return os.environ["SPARSE_ATTN_HF_COMMIT"]
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        common = git / "commondir"
        base = (git / common.read_text().strip()).resolve() if common.is_file() else git
        if (base / ref).is_file():
            return (base / ref).read_text().strip()
        for line in (base / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def run_meta(job: Prepared, seconds: float, command: str | None = None) -> dict:
    settings, model = job.settings, job.model
    labels = job.profile.streaming_heads(settings.streaming_fraction)
    return {
        "task": job.task,
        "model": job.model_name,
        "model_path": job.model_path,
        "profile": job.profile.source.name if job.profile.source is not None else f"(in memory: {job.profile.method})",
        "profile_method": job.profile.method,
        "settings": dataclasses.asdict(settings),
        "streaming_kv_heads": f"{int(labels.sum())}/{job.profile.head_score.numel()}",
        "haystack": job.haystack.source,
        "haystack_sha256": job.haystack.sha256,
        "needle": dataclasses.asdict(DEFAULT_NEEDLE) if job.task == "needle" else None,
        "chat_template": getattr(job.tokenizer, "chat_template", None) is not None,
        "lengths": job.lengths,
        "depths": job.depths,
        "seed": job.seed,
        "answer_tokens": NEW_TOKENS[job.task] or None,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "seconds": round(seconds, 1),
        "commit": source_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or "sparse_attn_hf.eval.harness.evaluate (Python)",
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in ("torch", "transformers", "triton", "sparse_attn_hf")},
    }
