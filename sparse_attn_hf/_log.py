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
