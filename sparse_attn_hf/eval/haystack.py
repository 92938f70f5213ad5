"""The pinned haystack: an original story in sixteen chapters, dedicated to the public domain (CC0).

Chapters One-Eight are the *calibration* half (used to make profiles), chapters Nine-Sixteen the
*evaluation* half (quickstart, fidelity measurements), so profiles are never judged on their own text.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

HAYSTACK = Path(__file__).with_name("data") / "haystack.txt"
SPLIT = "Chapter Nine"


@lru_cache(maxsize=None)
def haystack_text(part: str = "evaluation") -> str:
    """``part``: "evaluation" (chapters 9-16), "calibration" (chapters 1-8) or "all"."""
    text = HAYSTACK.read_text(encoding="utf-8")
    head, tail = text.split(SPLIT, 1)
    parts = {"calibration": head, "evaluation": SPLIT + tail, "all": text}
    if part not in parts:
        raise ValueError(f"part must be one of {sorted(parts)}, got {part!r}.")
    return parts[part]


def haystack_sha256() -> str:
    return hashlib.sha256(HAYSTACK.read_bytes()).hexdigest()
