"""Passkey retrieval: a number hidden at a chosen depth of a haystack, asked for at the end.

The prompt is a chat turn (the model's chat template) whose answer starts with "The pass key is".
Each cell is answered twice on the same prompt: by the model as loaded (dense attention) and by the
model patched with a profile (sparse). Greedy decoding; the answer is correct when it contains the key.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..api import patched
from ..record import last_call
from .haystack import haystack_text
from .prompts import INSTRUCTION, PasskeyPrompt, hide

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"  # the assistant's answer starts with it
_OVERHEAD = 90  # tokens of instruction, needle and question, about


def make_keys(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(count)]


def passkey_prompt(tokenizer, length: int, depth: float, key: str, part: str = "evaluation",
                   offset: int = 0) -> PasskeyPrompt:
    """A prompt of about ``length`` tokens with the needle after ``depth`` of the filler.

    The filler is the haystack ``part`` from token ``offset`` on, cut at the needle's depth.
    """
    ids, span = hide(tokenizer, haystack_text(part), length, depth, NEEDLE.format(key=key), QUESTION, ANSWER_PREFIX,
                     instruction=INSTRUCTION, overhead=_OVERHEAD, offset=offset)
    return PasskeyPrompt(length=length, depth=depth, key=key, input_ids=ids, needle=span)


@torch.no_grad()
def answer(model, tokenizer, prompt: PasskeyPrompt, max_new_tokens: int = 8) -> tuple[str, torch.Tensor]:
    """(greedy answer text, log-probabilities of the first answer token [vocab])."""
    out = model.generate(prompt.input_ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    text = tokenizer.decode(out.sequences[0, prompt.tokens :], skip_special_tokens=True)
    return text, F.log_softmax(out.logits[0][0].float(), dim=-1)


def kl_divergence(reference_logp: torch.Tensor, other_logp: torch.Tensor) -> float:
    """KL(reference || other) of two log-probability vectors (nats)."""
    return float((reference_logp.exp() * (reference_logp - other_logp)).sum())


def passkey_cells(model, tokenizer, prompt: PasskeyPrompt, settings) -> list[dict]:
    """JSON records of one prompt: answered dense once (model as given), then patched with each
    ``(profile, config)`` of ``settings``; KL compares the first answer token's distributions."""
    dense, dense_logp = answer(model, tokenizer, prompt)
    records = []
    for profile, config in settings:
        with patched(model, profile, config):
            sparse, sparse_logp = answer(model, tokenizer, prompt)
            ran = last_call(model)  # what the patched call ran (record.py)
        records.append({
            "length": prompt.length,
            "depth": prompt.depth,
            "key": prompt.key,
            "prompt_tokens": prompt.tokens,
            "dense_answer": dense.strip(),
            "sparse_answer": sparse.strip(),
            "dense_correct": prompt.key in dense,
            "sparse_correct": prompt.key in sparse,
            "kl": kl_divergence(dense_logp, sparse_logp),
            "ran": ran.summary(),
        })
    return records
