"""Held-out text: the Python reference manual's topics (``pydoc_data.topics``), shipped with every CPython
under the PSF licence, so nothing is fetched at run time. Documentation prose and code: another genre and
vocabulary than the package's story, on which the shipped profile was fitted.

Two halves, by topic name (sorted), with separate roles: ``"choosing"`` (the profiler picks the default
streaming fraction on it) and ``"reporting"`` (README figures: text that neither fitting nor choosing saw).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

PARTS = ("choosing", "reporting", "all")


@lru_cache(maxsize=None)
def heldout_text(part: str = "reporting") -> str:
    if part not in PARTS:
        raise ValueError(f"part must be one of {list(PARTS)}, got {part!r}.")
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ImportError("the held-out text is CPython's pydoc_data.topics, which this Python build lacks (some "
                          "distributions split it off: install the full standard library, for example Debian's "
                          "libpython3-stdlib).") from None

    names = sorted(topics)
    half = len(names) // 2
    chosen = {"choosing": names[:half], "reporting": names[half:], "all": names}[part]
    return "\n\n".join(topics[name] for name in chosen)


def heldout_sha256(part: str = "reporting") -> str:
    return hashlib.sha256(heldout_text(part).encode("utf-8")).hexdigest()
