"""Calibration data for profiling: passkey samples with their answers, and held-out text.

Every profiling method reads one :class:`Calibration`: the token stream of a text (the package's
calibration half of the haystack, or any text file), split into a *prompt* part (the filler of the
passkey samples) and a *held-out* tail (next-token KL of the SampleAttention sweep). Samples are drawn
from a seeded generator, so a seed gives the same samples on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..eval.haystack import haystack_sha256, haystack_text
from ..eval.needle import hide
from ..eval.passkey import ANSWER_PREFIX, INSTRUCTION, NEEDLE, QUESTION

DEPTHS = (0.05, 0.95)  # needle depth range (DuoAttention's)
LENGTH_STEPS = 8  # sample lengths come from this many evenly spaced values in [min, max]


@dataclass(frozen=True)
class Sample:
    """A passkey prompt followed by its answer (teacher forcing)."""

    input_ids: torch.Tensor  # [1, n]: prompt + answer tokens
    answer_rows: slice  # the positions whose outputs predict the answer's tokens
    needle: slice  # token positions of the needle sentence
    key: str
    length: int  # the target prompt length
    depth: float

    @property
    def prompt_tokens(self) -> int:
        return self.answer_rows.start + 1


@dataclass
class Calibration:
    tokenizer: object
    tokens: list[int]  # the whole text
    held_out: int  # tokens at the end kept for evaluation (never a sample's filler)
    description: str  # what the text is, for the profile's metadata

    @classmethod
    def from_text(cls, tokenizer, text: str | None = None, source: str | None = None,
                  held_out: int = 2048) -> "Calibration":
        """``text`` None: the package's calibration half of the haystack."""
        if text is None:
            text = haystack_text("calibration")
            source = f"haystack.txt chapters 1-8 (sha256 {haystack_sha256()[:16]})"
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        if len(tokens) < held_out + 256:
            raise ValueError(
                f"the calibration text ({source or 'given text'}) has {len(tokens)} tokens; profiling needs at least "
                f"{held_out + 256} (held-out {held_out} + 256 for prompts). Give a longer text with --text FILE."
            )
        return cls(tokenizer, tokens, held_out, source or "given text")

    @classmethod
    def from_file(cls, tokenizer, path: str | Path, held_out: int = 2048) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration text {str(path)!r} does not exist.")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"calibration text {str(path)!r} is empty; give a long plain-text file (10K+ tokens).")
        return cls.from_text(tokenizer, text, source=path.name, held_out=held_out)

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens) - self.held_out

    def held_out_ids(self, length: int) -> torch.Tensor:
        """[1, length]: the first ``length`` tokens of the held-out tail."""
        if length > self.held_out:
            raise ValueError(f"held-out text has {self.held_out} tokens, {length} were asked for.")
        start = self.prompt_tokens
        return torch.tensor([self.tokens[start : start + length]])

    def prompt_text(self) -> str:
        return self.tokenizer.decode(self.tokens[: self.prompt_tokens])

    def sample(self, rng: random.Random, length: int, depth: float | None = None) -> Sample:
        """A passkey prompt of about ``length`` tokens, filler from a random place of the prompt part."""
        depth = rng.uniform(*DEPTHS) if depth is None else depth
        key = str(rng.randint(10000, 99999))
        filler = length + 16  # at most: the prompt's other tokens take >= 1, re-tokenizing may add a few
        if filler > self.prompt_tokens:
            raise ValueError(
                f"a {length}-token sample needs up to {filler} filler tokens; the calibration text has {self.prompt_tokens} "
                "outside the held-out part. Use shorter --lengths or a longer --text."
            )
        offset = rng.randint(0, self.prompt_tokens - filler)
        ids, needle = hide(self.tokenizer, self.prompt_text(), length, depth, NEEDLE.format(key=key), QUESTION,
                           ANSWER_PREFIX, instruction=INSTRUCTION, offset=offset)
        answer = self.tokenizer(" " + key, return_tensors="pt", add_special_tokens=False).input_ids
        prompt_len = ids.shape[1]
        return Sample(torch.cat([ids, answer], dim=1), slice(prompt_len - 1, prompt_len - 1 + answer.shape[1]),
                      needle, key, length, depth)

    def samples(self, count: int, lengths: tuple[int, int], seed: int) -> list[Sample]:
        """``count`` samples, lengths evenly spaced in ``lengths`` (cycled), depths random; seeded."""
        rng = random.Random(seed)
        grid = length_grid(lengths)
        return [self.sample(rng, grid[i % len(grid)]) for i in range(count)]


def length_grid(lengths: tuple[int, int]) -> list[int]:
    low, high = lengths
    if not 0 < low <= high:
        raise ValueError(f"lengths must be MIN,MAX with 0 < MIN <= MAX, got {low},{high}.")
    steps = 1 if low == high else LENGTH_STEPS
    return sorted({round(low + (high - low) * i / max(steps - 1, 1)) for i in range(steps)})
