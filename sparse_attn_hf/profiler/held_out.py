"""Choosing a profile's default streaming fraction by agreement with dense attention on held-out text.

Three roles for text, kept apart: the head scores are fitted on the calibration text; the default fraction
is chosen here, on a *choosing* text the fit never saw; reports use a third text that neither saw.

For each candidate fraction the patched model answers the same passkey and needle cells as dense
attention; a cell is *lost* when dense answers it right and the patched model does not. The rule: the
largest fraction that loses no cell, provided that fraction + ``STEP`` (measured too) loses at most one:
a margin, not a knife edge. The table and the choice go into the profile's metadata (``fraction_choice``);
a profile whose default exceeds the choice is refused unless ``ALLOW_FLAG`` is given.
"""

from __future__ import annotations

import json

STEP = 0.05
ALLOW_FLAG = "--allow-unchecked-fraction"
FRACTIONS = tuple(round(0.25 + STEP * i, 2) for i in range(11))  # candidate fractions, 0.25 to 0.75
LENGTHS = (1024, 2048, 4096)  # prompt lengths of the cells
LATE_LENGTHS, LATE_DEPTHS, LATE_SEEDS = (2048, 4096), (0.7, 0.8, 0.9, 0.95), (0, 1, 2, 3, 4)  # late-key cells
CHOOSING_TEXTS = ("heldout:choosing", "prose:lcet10")  # two genres; reports use the manual's other half and Alice


def choose_fraction(rows: list[dict], step: float = STEP) -> dict:
    """rows: one per measured fraction, ``{"fraction", "cells", "dense_correct", "lost", ...}``. Returns
    ``{"fraction": the largest passing fraction or None, "rule": ..., "rows": rows sorted}``."""
    if not rows:
        raise ValueError("choose_fraction needs at least one measured fraction.")
    rows = sorted(rows, key=lambda r: r["fraction"])
    by_fraction = {round(r["fraction"], 6): r for r in rows}
    passing = []
    for row in rows:
        above = by_fraction.get(round(row["fraction"] + step, 6))
        if row["lost"] == 0 and above is not None and above["lost"] <= 1:
            passing.append(row["fraction"])
    return {"fraction": max(passing) if passing else None,
            "rule": f"largest fraction losing no dense-correct cell whose fraction + {step} loses at most one",
            "rows": rows}


def check_default(fraction: float, choice: dict | None, allow: bool = False) -> None:
    """Refuse a default fraction above the held-out choice (or without one) unless ``allow``."""
    if allow:
        return
    if choice is None or choice.get("fraction") is None:
        raise ValueError(f"no fraction passed the held-out rule, so the default {fraction} is unchecked; pass "
                         f"{ALLOW_FLAG} to write it anyway.")
    if fraction > choice["fraction"] + 1e-9:
        raise ValueError(f"the default streaming fraction {fraction} exceeds the held-out choice "
                         f"{choice['fraction']} (it loses answers dense attention gets right); use "
                         f"--streaming-fraction {choice['fraction']} or pass {ALLOW_FLAG}.")


def to_metadata(choice: dict, text: str) -> str:
    """The JSON stored in a profile's ``fraction_choice`` metadata."""
    return json.dumps({**choice, "choosing_text": text}, separators=(",", ":"))


def from_metadata(value: str) -> dict | None:
    return json.loads(value) if value else None


def measure(model, tokenizer, profile, cells, fractions, text_ids, max_new_tokens: int = 12, progress=None,
            stop_at_lost: int | None = 2, settings: dict | None = None) -> list:
    """One row per fraction: lost cells, answers, first-answer-token KL and mean next-token KL on
    ``text_ids``, all against dense attention. ``cells``: ``(input_ids [1, n], is_correct(answer) -> bool)``;
    ``settings``: further ``SparseConfig`` fields (for example a token budget).

    A fraction stops answering cells once it has lost ``stop_at_lost`` (the rule cannot take it nor use it as
    a margin any more): its row then says ``"stopped_after"`` cells, and its counts are lower bounds."""
    import torch
    import torch.nn.functional as F

    from ..api import patched
    from ..config import SparseConfig

    @torch.no_grad()
    def run(ids):
        out = model.generate(ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        return text, F.log_softmax(out.logits[0][0].float(), dim=-1)

    @torch.no_grad()
    def text_logp():
        return F.log_softmax(model(text_ids.to(model.device), use_cache=False).logits[0].float(), dim=-1)

    def kl(p, q):
        return float((p.exp() * (p - q)).sum(-1).mean())

    dense = [run(ids) for ids, _ in cells]
    dense_right = [check(text) for (_, check), (text, _) in zip(cells, dense)]
    dense_text = text_logp()
    rows = []
    for fraction in fractions:
        got, right, lost = [], [], 0
        settings = {"page_selection": "always", **(settings or {})}  # the method as on a GPU, on a CPU too
        with patched(model, profile, SparseConfig(streaming_fraction=fraction, **settings)):
            for (ids, check), was_right in zip(cells, dense_right):
                got.append(run(ids))
                right.append(check(got[-1][0]))
                lost += was_right and not right[-1]
                if stop_at_lost is not None and lost >= stop_at_lost:
                    break
            text_kl = kl(dense_text, text_logp())
        row = {"fraction": fraction, "cells": len(cells), "dense_correct": sum(dense_right), "lost": lost,
               "gained": sum(s and not d for d, s in zip(dense_right, right)),
               "first_token_kl": sum(kl(d[1], s[1]) for d, s in zip(dense, got)) / len(got), "text_kl": text_kl}
        if len(got) < len(cells):
            row["stopped_after"] = len(got)
        row["cell_lost"] = [bool(d and not g) for d, g in zip(dense_right, right)]
        rows.append(row)
        if progress is not None:
            progress.update(1)
    return rows


def held_out_cells(tokenizer, text: str, lengths=LENGTHS, depths=(0.1, 0.3, 0.5, 0.7, 0.9),
                   offsets=(0, 1), seed: int = 5) -> list:
    """Passkey and needle cells hidden in ``text``: lengths x depths x offsets x both tasks (60 by default).
    Offsets shift where the filler starts (the needle task has one fact; its cells differ by filler)."""
    from ..eval.needle import DEFAULT_NEEDLE, hide, needle_prompt, retrieval_score
    from ..eval.passkey import ANSWER_PREFIX, INSTRUCTION, NEEDLE, QUESTION, make_keys

    keys = iter(make_keys(len(lengths) * len(depths) * len(offsets), seed=seed))
    cells = []
    for length in lengths:
        for depth in depths:
            for shift in offsets:
                key = next(keys)
                ids, _ = hide(tokenizer, text, length, depth, NEEDLE.format(key=key), QUESTION, ANSWER_PREFIX,
                              instruction=INSTRUCTION, offset=1733 * shift)
                cells.append((ids, lambda answer, key=key: key in answer))
                ids = needle_prompt(tokenizer, text, length, depth, offset=2311 * shift + 97).input_ids
                cells.append((ids, lambda answer: retrieval_score(answer, DEFAULT_NEEDLE.answer_words) == 1.0))
    return cells


def late_key_prompts(tokenizer, text: str, lengths=LATE_LENGTHS, depths=LATE_DEPTHS, seeds=LATE_SEEDS) -> list[dict]:
    """Passkeys hidden late in ``text`` (depth 0.9 of 4K puts the key ~400 tokens before the question, past a
    256-token local window): per seed its own key and its own stretch of filler. Each prompt: ``{"L", "depth",
    "seed", "key", "ids", "span" (the needle's tokens), "key_distance" (tokens from its end to the prompt's end)}``."""
    from ..eval.needle import hide
    from ..eval.passkey import ANSWER_PREFIX, INSTRUCTION, NEEDLE, QUESTION, make_keys

    prompts = []
    for seed in seeds:
        key = make_keys(1, seed=1000 + seed)[0]
        for length in lengths:
            for depth in depths:
                ids, span = hide(tokenizer, text, length, depth, NEEDLE.format(key=key), QUESTION, ANSWER_PREFIX,
                                 instruction=INSTRUCTION, offset=1733 * seed)
                prompts.append({"L": length, "depth": depth, "seed": seed, "key": key, "ids": ids, "span": span,
                                "key_distance": ids.shape[1] - span.stop})
    return prompts


def late_key_cells(tokenizer, text: str, **grid) -> list:
    """``late_key_prompts`` as cells for ``measure``: ``(input_ids, is_correct(answer))``."""
    return [(p["ids"], lambda answer, key=p["key"]: key in answer) for p in late_key_prompts(tokenizer, text, **grid)]
