"""Needle in a haystack: a sentence-level fact hidden at a chosen depth of any text, asked for at the end.

:func:`.prompts.hide` builds the prompt for any needle and haystack text (the passkey prompt of
:mod:`.passkey` is its special case: same instruction, chat turn and answer prefix, tested equal).
:func:`needle_cells` answers a prompt dense once and sparse per setting, like
:func:`.passkey.passkey_cells`, and scores the answer by the fact's key words it contains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..api import patched
from ..record import last_call
from .passkey import answer, kl_divergence
from .prompts import PasskeyPrompt, hide


@dataclass(frozen=True)
class Needle:
    """A fact, the question that asks for it, the answer's first words and the words that must follow."""

    sentence: str
    question: str
    answer_prefix: str
    answer_words: tuple[str, ...]


# Original text; the default haystack has none of its key words.
DEFAULT_NEEDLE = Needle(
    sentence="The secret ingredient in Professor Quill's famous winter stew is a spoonful of wild blackberry jam.",
    question="What is the secret ingredient in Professor Quill's famous winter stew?",
    answer_prefix="The secret ingredient in Professor Quill's famous winter stew is",
    answer_words=("wild", "blackberry", "jam"),
)
MAX_NEW_TOKENS = 12  # enough for "a spoonful of wild blackberry jam."


def needle_prompt(tokenizer, text: str, length: int, depth: float, needle: Needle = DEFAULT_NEEDLE,
                  offset: int = 0) -> PasskeyPrompt:
    """The needle prompt of about ``length`` tokens; its ``key`` is the fact's key words."""
    ids, span = hide(tokenizer, text, length, depth, needle.sentence, needle.question, needle.answer_prefix,
                     offset=offset)
    return PasskeyPrompt(length=length, depth=depth, key=" ".join(needle.answer_words), input_ids=ids, needle=span)


def retrieval_score(answer_text: str, words) -> float:
    """Share of ``words`` found as whole words in the answer (case-insensitive)."""
    found = set(re.findall(r"[\w']+", answer_text.lower()))
    return sum(w.lower() in found for w in words) / len(words)


def needle_cells(model, tokenizer, prompt: PasskeyPrompt, settings, needle: Needle = DEFAULT_NEEDLE,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """JSON records of one prompt, answered dense once and patched with each ``(profile, config)``:
    the answers, their scores (share of the fact's key words), correct (all of them) and the KL of the
    first answer token's distributions (dense || sparse)."""
    dense, dense_logp = answer(model, tokenizer, prompt, max_new_tokens)
    records = []
    for profile, config in settings:
        with patched(model, profile, config):
            sparse, sparse_logp = answer(model, tokenizer, prompt, max_new_tokens)
            ran = last_call(model)  # what the patched call ran (record.py)
        dense_score, sparse_score = (retrieval_score(a, needle.answer_words) for a in (dense, sparse))
        records.append({
            "length": prompt.length,
            "depth": prompt.depth,
            "expected": prompt.key,
            "prompt_tokens": prompt.tokens,
            "dense_answer": dense.strip(),
            "sparse_answer": sparse.strip(),
            "dense_score": dense_score,
            "sparse_score": sparse_score,
            "dense_correct": dense_score == 1.0,
            "sparse_correct": sparse_score == 1.0,
            "kl": kl_divergence(dense_logp, sparse_logp),
            "ran": ran.summary(),
        })
    return records
