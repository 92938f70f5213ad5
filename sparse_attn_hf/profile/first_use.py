"""A profile for any model on first use: head scores from attention statistics, no tokenizer, cached on disk.

When no shipped profile matches a model and none is given, ``patch_model`` calibrates one here (or on
``profile="calibrate"``; ``python -m sparse_attn_hf.profile calibrate MODEL`` from the command line):

* **probes**: sequences of random tokens of the model's vocabulary (seeded) in which a *needle* segment of
  ``NEEDLE`` tokens appears at some depth and again at the end. Predicting the repeated needle's next token means
  retrieving it from the first occurrence: the heads that put attention mass there (retrieval, copy and induction
  heads, which DuoAttention's gate training keeps dense) need the whole context; heads that do not may stream.
  No tokenizer and no text are needed, so any causal LM can be calibrated as it is loaded;
* **scores**: the attention mass of the repeated needle's rows on the first occurrence (dense attention, one
  forward per probe), ranked over all (layer, KV head) pairs, the most demanding query head of each group
  (``attention_stats``: the profiler's statistics scorer);
* **cache**: the profile is saved under the user's cache folder, keyed by the model's shapes and weight fingerprint
  and the package version, so a later process loads it at once (``cache_folder``).

It is a statistics profile, weaker than gate training (``python -m sparse_attn_hf.profile --method duo``): its
streaming fraction defaults to ``FRACTION``, 0, chosen by the shipped profile's held-out rule (the highest fraction
that loses no dense-correct held-out cell): on the default model the calibrated labels lost the same needle at
every fraction from 0.05 to 0.25, so by default no head streams (exact prefill; decoding keeps the CUDA graph and
page selection), and ``SparseConfig(streaming_fraction=...)`` streams the heads the statistics rank least
demanding, at the user's choice (docs/models.md has the figures); its window scales with the model's positions
(LServe's sink 128 + local 4096 at 128K, 64 + 256 at 8K); SampleAttention stays off (no sweep measured that it
pays). The WARNING ``patch_model`` logs says how to make a better one.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import torch

from .format import Profile, model_shape, weight_fingerprint
from .attention_stats import needle_mass, per_kv_head, rank_normalize

NEEDLE = 32  # tokens of the needle segment
REPEAT = 16  # of which the last occurrence repeats this many (the rows that retrieve)
FRACTION = 0.0  # the calibrated profile's streaming fraction: the held-out rule's choice (docs/models.md)
KEY_VERSION = 2  # part of the cache key: a profile calibrated under other defaults is not reused
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def cache_folder() -> Path:
    """``$SPARSE_ATTN_HF_CACHE``, else ``$XDG_CACHE_HOME/sparse_attn_hf``, else ``~/.cache/sparse_attn_hf``."""
    if os.environ.get("SPARSE_ATTN_HF_CACHE"):
        return Path(os.environ["SPARSE_ATTN_HF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse_attn_hf"


def cache_path(model) -> Path:
    """Where the calibrated profile of ``model`` is kept: its shapes, its weight fingerprint, the package version."""
    from .. import __version__

    shape = model_shape(model)
    fingerprint = weight_fingerprint(model)
    if fingerprint is None:
        raise ValueError("calibrating a profile needs the model's weights (they are not loaded: meta device).")
    key = hashlib.sha256(repr((sorted(shape.items()), [round(float(v), 5) for v in fingerprint], KEY_VERSION,
                               FRACTION)).encode())
    return cache_folder() / "profiles" / f"{shape['model_type']}-{key.hexdigest()[:16]}-v{__version__}.safetensors"


def probes(vocab_size: int, length: int, count: int, seed: int = 0):
    """``count`` probes of ``length`` tokens: (ids [1, L], needle slice, rows slice). Token ids avoid the first
    ``min(1000, vocab / 10)`` ids, where special tokens usually live."""
    rng = random.Random(seed)
    low = min(1000, vocab_size // 10)
    made = []
    for i in range(count):
        ids = [rng.randrange(low, vocab_size) for _ in range(length)]
        depth = DEPTHS[i % len(DEPTHS)]
        start = int(depth * (length - NEEDLE - REPEAT - 1))
        needle = ids[start : start + NEEDLE]
        ids[length - REPEAT :] = needle[:REPEAT]  # the end repeats the needle's beginning
        # rows predicting the repeated tokens 2..REPEAT (the first one cannot be retrieved: nothing announces it)
        made.append((torch.tensor([ids]), slice(start, start + NEEDLE), slice(length - REPEAT, length - 1)))
    return made


def calibrate(model, *, length: int | None = None, count: int = 8, seed: int = 0, progress: bool = False,
              **settings) -> Profile:
    """A profile for ``model`` from attention statistics on ``count`` random-token retrieval probes of ``length``
    tokens (default: 2048 on a CPU, 4096 on a GPU, at most the model's positions)."""
    config = model.config.get_text_config(decoder=True)
    device = next(model.parameters()).device
    if length is None:
        length = 4096 if device.type == "cuda" else 2048
        length = min(length, getattr(config, "max_position_embeddings", length) or length)
    if length < NEEDLE + REPEAT + 64:
        raise ValueError(f"probes of {length} tokens are too short to separate the heads (at least "
                         f"{NEEDLE + REPEAT + 64}).")
    started = time.perf_counter()
    kv_heads = model_shape(model)["num_kv_heads"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, desc="calibrating", unit="probe")
    masses = []
    try:
        for ids, needle, rows in probes(config.vocab_size, length, count, seed):
            masses.append(needle_mass(model, ids, needle, rows))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    scores = rank_normalize(per_kv_head(torch.stack(masses).mean(0), kv_heads))
    seconds = time.perf_counter() - started
    positions = int(getattr(config, "max_position_embeddings", 0) or 131072)
    settings.setdefault("streaming_fraction", FRACTION)
    # the window in proportion to the context the model was made for: LServe's 128 + 4096 at 128K positions, the
    # default model's 64 + 256 at 8K (a 4096-token window would cover half of an 8K model's context)
    settings.setdefault("sink_size", 128 if positions > 8192 else 64)
    settings.setdefault("local_size", min(4096, max(256, positions // 32)))
    settings.setdefault("alpha", 1.0)  # SampleAttention only where a sweep showed it pays (the profiler's --sweep)
    settings.setdefault("method", f"calibrated on first use: attention mass of repeated random-token segments "
                                  f"({count} probes of {length} tokens, {seconds:.0f} s)")
    settings.setdefault("calibration", f"random token ids of the vocabulary, seed {seed}")
    settings.setdefault("model_name", str(getattr(model.config, "_name_or_path", "") or ""))
    settings.setdefault("checkpoint", settings["model_name"])
    profile = Profile.from_scores(model, scores, **settings)
    profile.seconds = seconds
    return profile


def _what_it_does(profile: Profile, path: Path) -> str:
    better = (f"To stream heads: python -m sparse_attn_hf.profile choose-fraction {path} --model MODEL --out PROFILE "
              "picks the highest fraction that loses no held-out answer of this model (needs its tokenizer); a "
              "gate-trained profile is better still: python -m sparse_attn_hf.profile --method duo --model MODEL "
              "--out PROFILE (docs/models.md, Making a profile).")
    if profile.streaming_fraction == 0:
        return ("No head streams (streaming fraction 0: statistics labels lost held-out answers at every fraction "
                "above 0 on the default model): prefill is exact, decoding replays the CUDA graph with page "
                "selection; SparseConfig(streaming_fraction=0.25) streams the heads these statistics rank least "
                "demanding, at that risk. " + better)
    return f"Streaming fraction {profile.streaming_fraction}. " + better


def calibrated_profile(model, *, why: str | None = None) -> Profile:
    """The cached calibrated profile of ``model``, or a new one (saved to the cache); a new one is announced with a
    WARNING saying why, how long it took, where it is and how to make a better one."""
    from .._log import warn_once

    path = cache_path(model)
    if path.is_file():
        try:
            profile = Profile.load(path)
        except ValueError:
            profile = None  # a damaged cache file: calibrate again
        if profile is not None:
            warn_once(f"sparse_attn_hf: {why + '; ' if why else ''}using the profile calibrated for this model on "
                      f"first use ({path}). {_what_it_does(profile, path)}")
            return profile
    profile = calibrate(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile.save(path)
    warn_once(f"sparse_attn_hf: {why + '; ' if why else ''}calibrated a profile for this model from attention "
              f"statistics in {profile.seconds:.0f} s, saved to {path} for later processes. "
              f"{_what_it_does(profile, path)}")
    return profile


__all__ = ["cache_folder", "cache_path", "calibrate", "calibrated_profile", "probes"]
