"""Prompt building shared by the passkey and needle tasks: a fact hidden at a chosen depth of a haystack text, in a
chat turn that ends with the answer's first words."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)


class HaystackTooShort(ValueError):
    """The haystack has fewer tokens than the prompt's filler needs."""


@dataclass(frozen=True)
class PasskeyPrompt:
    length: int  # target length in tokens
    depth: float  # position of the needle in the filler, 0 = start, 1 = end
    key: str
    input_ids: torch.Tensor  # [1, n]
    needle: slice  # token positions of the needle sentence

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


@lru_cache(maxsize=8)
def _tokens(tokenizer, text: str) -> tuple[int, ...]:
    """The haystack's tokens, once per (tokenizer, text): a grid of cells cuts many prompts from one text."""
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


def hide(tokenizer, text: str, length: int, depth: float, needle: str, question: str, answer_prefix: str, *,
         instruction: str = INSTRUCTION, overhead: int | None = None, offset: int = 0) -> tuple[torch.Tensor, slice]:
    """(input_ids [1, n], token span of ``needle``): ``needle`` after ``depth`` of ``length - overhead``
    filler tokens of ``text`` (from token ``offset``), in a chat turn that ends with ``answer_prefix``.

    ``overhead``: tokens reserved for everything but the filler; ``None`` measures it on this tokenizer,
    so that the prompt has about ``length`` tokens. A tokenizer without a chat template gets the plain
    text ``content + "\\n\\n" + answer_prefix``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}.")

    def build(before: str, after: str) -> str:
        content = f"{instruction}\n\n{before}\n\n{needle}\n\n{after}\n\n{question}"
        if getattr(tokenizer, "chat_template", None) is None:
            return f"{content}\n\n{answer_prefix}"
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix

    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    if overhead is None:
        overhead = count(build("", ""))
    filler_len = length - overhead
    if filler_len < 1:
        raise ValueError(f"length {length} is too short for this prompt (at least {overhead + 1} tokens).")
    hay = _tokens(tokenizer, text)
    if offset + filler_len > len(hay):
        raise HaystackTooShort(f"the haystack has {len(hay)} tokens; {offset} + {filler_len} do not fit.")
    filler = hay[offset : offset + filler_len]
    cut = int(depth * filler_len)
    prompt = build(tokenizer.decode(list(filler[:cut])), tokenizer.decode(list(filler[cut:])))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    at = prompt.index(needle)
    return ids, slice(count(prompt[:at]), count(prompt[: at + len(needle)]))
