"""Compile ahead of the first prompt: what a fresh process's first ``generate()`` would otherwise pay.

A patched model's kernels are Triton's: each is compiled for the model's dtype, head size and flags the first time
it runs in a process (from Triton's disk cache when an earlier process compiled it; seconds when none did). On the
8B shape the first 32K ``generate()`` of a fresh process took 8.06 s against 1.69 s warm, most of it compiling.
``warm_up`` runs the patched model on a short synthetic prompt, once with every sparse path forced on (streaming
windows, SampleAttention's sampling, page selection in decode, the decode graph) and once with the user's settings,
so that every kernel a real call runs has been compiled, and CUDA's libraries have been initialised, before the
user's first prompt. Kernel arguments that change with the length are not specialised on (``do_not_specialize``),
so a short prompt compiles what a long one runs; page selection's constants follow the token budget, so the forced
call selects at the model's own budget (its prompt a little longer than the budget, up to ``LONGEST``), and the
top-k kernel's row buckets (one per range of context lengths) are compiled up to the model's longest context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings

import torch

from . import ops
from ._log import warn_once
from .config import UNLIMITED_BUDGET
from .record import CallRecord

PROMPT = 1024  # tokens of the synthetic prompt: several pages, past the decode window of every shipped profile
LONGEST = 16384  # the longest warm-up prompt: past a token budget up to this, selection runs at the model's budget
NEW_TOKENS = 6  # two eager decode steps, the capture, replays


def wanted(model, state) -> bool:
    """Whether ``patch_model`` warms ``model`` up: its settings ask for it, its weights are on CUDA, and it can
    generate; not a tensor-parallel rank (its generate() is a collective: the ranks' first calls go together)."""
    if not state.settings.warm_up or not callable(getattr(type(model), "generate", None)) or state.heads.sharded:
        return False
    devices = {p.device.type for p in model.parameters()}
    return devices == {"cuda"}


def warm_up(model, state) -> float | None:
    """Run ``model`` (patched) on a synthetic prompt with every sparse path on, then with its own settings; returns
    the seconds it took. Leaves no record, no cache and the settings as they were. A warm-up that fails says why
    (a WARNING) and returns None: the model stays patched, and its first call compiles what it runs."""
    try:
        return _warm_up(model, state)
    except Exception as error:  # noqa: BLE001 - an optimisation: the user's own call decides what fails
        warn_once(f"sparse_attn_hf: the warm-up run on a synthetic prompt failed ({type(error).__name__}: "
                  f"{str(error)[:200]}); the first generate() compiles the kernels instead.")
        return None


def _selects(settings) -> bool:
    return settings.page_selection != "never" and settings.token_budget != UNLIMITED_BUDGET


def prompt_length(settings, positions: int) -> int:
    """Tokens of the synthetic prompt: ``PROMPT``, or two pages past the token budget where that is at most
    ``LONGEST`` (decode steps then select at the model's own budget), within the model's positions."""
    wanted = PROMPT
    if _selects(settings) and settings.token_budget + 2 * settings.page_size <= LONGEST:
        wanted = max(PROMPT, settings.token_budget + 2 * settings.page_size)
    return max(2, min(wanted, positions - NEW_TOKENS - 1))


def forced_settings(settings, length: int):
    """``settings`` with every sparse path they can take forced on for a prompt of ``length``: the streaming window
    from the first token; SampleAttention from the first token, in every layer, at an alpha low enough for its
    masks to pay (so that the stripe kernel compiles too); page selection every step, at the model's budget where
    the prompt passes it (the kernels' constants follow the budget), else at two pages. A path the settings turn
    off (``alpha=1``, ``page_selection="never"``, an unlimited budget) stays off: nothing is compiled that the model
    will not run."""
    changes = dict(streaming_from=0)
    if settings.alpha < 1.0:
        changes.update(dense_below=0, alpha=min(settings.alpha, 0.5), sample_stop_after=0)
    if _selects(settings):
        budget = settings.token_budget if settings.token_budget < length else 2 * settings.page_size
        changes.update(page_selection="always", token_budget=budget, reuse_interval=1)
    return dataclasses.replace(settings, **changes)


def _warm_up(model, state) -> float:
    settings = state.settings
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or 1000
    positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or PROMPT * 2
    length = prompt_length(settings, positions)
    forced = forced_settings(settings, length)
    ids = torch.randint(min(3, vocab - 1), vocab, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    start = time.perf_counter()
    try:
        for config in (forced, settings):
            state.settings = config
            _generate(model, ids, settings)
    finally:
        state.settings = settings
        state.record = CallRecord()
        state.masks.clear()
        state.sample_choices.clear()
    if _selects(settings):  # every context length's top-k bucket
        ops.compile_top_pages(-(-(positions + 1) // settings.page_size), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _generate(model, ids, settings) -> None:
    new_tokens = 1 if settings.decode_compile else NEW_TOKENS  # Transformers' own compile is its first call's
    with warnings.catch_warnings(), _quiet_transformers(), torch.no_grad():
        warnings.simplefilter("ignore")
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
