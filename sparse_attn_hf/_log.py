"""Library logging: one logger, and messages that are logged once per reason."""

from __future__ import annotations

import logging

logger = logging.getLogger("sparse_attn_hf")
_seen: set[str] = set()


def log_once(reason: str, level: int = logging.INFO) -> None:
    """Log ``reason`` the first time it occurs in this process."""
    if reason not in _seen:
        _seen.add(reason)
        logger.log(level, reason)


def warn_once(reason: str) -> None:
    """A WARNING, once per reason and process, where the user loses speed or memory they asked for (a decode step
    that does not replay its graph, a kernel replaced by the reference, a cache that grows): a default logging
    setup prints it. Expected decisions (a short prompt run dense) go to ``record.CallRecord`` instead."""
    log_once(reason, logging.WARNING)
