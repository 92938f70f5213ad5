"""Run-time settings: one validated dataclass that overrides the profile's defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .profile import Profile


@dataclass(frozen=True)
class SparseConfig:
    """Settings of a patched model. A field left at ``None`` takes the profile's value.

    Streaming heads (static sparsity, the same rule in prefill and decode): the query at slot ``i`` of
    a row sees key ``j`` when ``j - first_real_slot < sink_size`` or ``i - j < local_size`` (and
    ``j <= i``). One window serves prefill and decode, so that a prompt prefilled in chunks gives the
    same result as in one piece; a streaming head's cache holds ``sink_size + local_size`` tokens.

    Args:
        streaming_fraction: fraction of (layer, KV head) pairs that stream, in [0, 1]; the heads with
            the lowest profile scores stream (global quantile, ties broken by (layer, head) order).
        sink_size: number of first real tokens every streaming head keeps (>= 0).
        local_size: local window of streaming heads in tokens, the query itself included (>= 1).
        page_size: tokens per physical KV page of dense heads (multiple of ``logical_page_size``).
        logical_page_size: tokens per logical page; the cache keeps per-logical-page key min/max.
        query_tile: query rows per tile in the PyTorch reference path (memory ~ tile x length).
        token_budget: tokens each dense head reads per decode step (a multiple of ``page_size``, at
            least two pages): the first real page, the newest page and the best-scoring pages.
            A context that fits the budget is attended in full (exact dense decoding).
        reuse_interval: decode steps that share one page selection (>= 1); a prefill or continuation
            always selects anew.
        decode_local_size: local window of streaming heads in decode steps (one query token); the
            ring buffer shrinks to it when decoding starts (LServe: prefill 4096, decode 256). Capped
            at ``local_size``. A continuation after decoding sees the decode window's tokens of the
            earlier text (plus sink).

    Example:
        >>> patch_model(model, config=SparseConfig(streaming_fraction=0.25, local_size=512))
    """

    streaming_fraction: float | None = None
    sink_size: int | None = None
    local_size: int | None = None
    page_size: int | None = None
    logical_page_size: int | None = None
    query_tile: int = 256
    token_budget: int | None = None
    reuse_interval: int | None = None
    decode_local_size: int | None = None

    def __post_init__(self) -> None:
        if self.streaming_fraction is not None and not 0.0 <= float(self.streaming_fraction) <= 1.0:
            raise ValueError(
                f"SparseConfig.streaming_fraction={self.streaming_fraction} is outside [0, 1]; "
                "use 0 for all heads dense, 0.5 for the published default."
            )
        _check_int("sink_size", self.sink_size, minimum=0)
        _check_int("local_size", self.local_size, minimum=1)
        _check_int("page_size", self.page_size, minimum=1)
        _check_int("logical_page_size", self.logical_page_size, minimum=1)
        _check_int("query_tile", self.query_tile, minimum=1)
        _check_int("token_budget", self.token_budget, minimum=1)
        _check_int("reuse_interval", self.reuse_interval, minimum=1)
        _check_int("decode_local_size", self.decode_local_size, minimum=1)
        if self.token_budget is not None and self.page_size is not None:
            if self.token_budget % self.page_size or self.token_budget < 2 * self.page_size:
                raise ValueError(
                    f"SparseConfig.token_budget={self.token_budget} must be a multiple of page_size={self.page_size} "
                    f"and at least two pages ({2 * self.page_size}); for example 4096 with pages of 64."
                )
        if self.page_size is not None and self.logical_page_size is not None:
            if self.page_size % self.logical_page_size:
                raise ValueError(
                    f"SparseConfig.page_size={self.page_size} is not a multiple of "
                    f"logical_page_size={self.logical_page_size}; use for example 64 and 16."
                )

    def resolve(self, profile: "Profile") -> "SparseConfig":
        """Return a copy with every ``None`` field filled from ``profile`` (and validated again)."""
        filled = {
            f.name: getattr(profile, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is None
        }
        return dataclasses.replace(self, **filled)


def _check_int(name: str, value, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SparseConfig.{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"SparseConfig.{name}={value} must be >= {minimum}.")
