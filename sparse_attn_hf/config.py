"""Run-time settings: one validated dataclass that overrides the profile's defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .profile import UNLIMITED_BUDGET, Profile  # noqa: F401 - UNLIMITED_BUDGET: part of this module's API


@dataclass(frozen=True)
class SparseConfig:
    """Settings of a patched model. A field left at ``None`` takes the profile's value.

    Streaming heads (static sparsity, the same rule in prefill and decode): the query at slot ``i`` of
    a row sees key ``j`` when ``j - first_real_slot < sink_size`` or ``i - j < local_size`` (and
    ``j <= i``). One window serves prefill and decode, so that a prompt prefilled in chunks gives the
    same result as in one piece (with ``streaming_from=0``: by default a short one-shot prefill runs every
    head dense, see ``streaming_from``); a streaming head's cache holds ``sink_size + local_size`` tokens.

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
            A context that fits the budget is attended in full (exact dense decoding);
            ``config.UNLIMITED_BUDGET`` (what ``Profile.all_dense`` sets) makes every context fit.
        reuse_interval: decode steps that share one page selection (>= 1); a prefill or continuation
            always selects anew.
        page_selection: ``"auto"`` (the default): page selection where it pays, on CUDA; on a CPU decode steps read
            every stored token of the dense heads (exact), since gathering the chosen pages costs more there than
            reading them all (the keys are a few MB against the weights: ``benchmarks/e2e/cpu_decode.py``).
            ``"always"``: select on every device (to evaluate the method on a CPU); ``"never"``: exact everywhere.
        shortlist: page selection's short list, in pages per page selected (>= 1). The bound on each page's
            best key short-lists ``shortlist`` x the pages, whose keys are then read to rank them by exact
            attention mass (``methods.page_selection``); 1 selects by the bound alone (Quest). With a budget of
            1/4 of the context, the default 4 kept 27 of 34 answers dense attention got right on held-out text,
            the bound alone 11 (``benchmarks/results/heldout_fidelity.json``), for about 0.16 ms more per token
            on the 8B shape (README, decoding).
        alpha: SampleAttention's kept-attention target for the dense heads in prefill, in (0, 1]
            (1 = exact dense attention); the paper's main setting is 0.95, 0.8 is faster.
        rw: SampleAttention's local window as a fraction of the sequence, in (0, 1).
        r_row: fraction of query rows SampleAttention samples, in (0, 1) (the last 64 rows always). The
            profile default 0.025 is half the paper's 0.05: on the default model at 8K it moved no layer's
            chosen density by more than 0.02 and it halves the selection's cost (benchmarks/NOTES.md).
        dense_below: sequences shorter than this many tokens run the dense heads dense (SampleAttention
            gains nothing at short lengths: its sampling costs more than it saves). 0 forces it on.
        sample_stop_after: SampleAttention pays or stays out of the way: once this many sampled layers in a row of
            one forward chose masks too dense to pay (run dense after paying for the sampling), the forward's later
            layers run their dense heads dense without sampling (``last_call`` says so). On the 8B shape with random
            weights every layer's mask was too dense (0.93) and the sampling alone made a 32K prefill 1.22x stock's;
            on the default model's real weights only layer 0 was (0.77; the others 0.15-0.27), so 3 stops nothing
            there. 0: sample every layer.
        streaming_from: prefill lengths (keys) from which streaming heads attend to their sink + window;
            a shorter one-shot prefill runs every head dense (exact), where the window covers so much of
            causal attention that the sparse kernel would cost more than dense attention (the cache
            still keeps only sink + window). ``None``: decided per call by the measured cost model
            (``sparse_attn_hf.cost``; about 2.5 x (sink_size + local_size)); 0: always the window.
        cra_criterion: ``"mean"`` (the mean kept mass over sampled rows reaches alpha, the paper's
            practical criterion) or ``"min"`` (every sampled row keeps alpha: the strict CRA, many
            more stripes; its search materializes [rows, L] scores, for short sequences).
        record_masks: keep each layer's last SampleAttention mask (``model._sparse_attn_state.masks``),
            for inspection.
        decode_graphs: ``generate()`` on one CUDA device replays its decode steps from a CUDA graph after two
            eager ones (``sparse_attn_hf.decode_graph``): on the 8B shape about 8 ms per token at 32K-128K
            against about 53 ms eager (``benchmarks/e2e/bench_e2e.py``). False: every step eager. Steps the graph
            would not reproduce run eagerly either way, with the reason logged once.
        decode_compile: a SparseCache reports ``is_compileable``, so that Transformers' own decode compile
            (``generate(..., compile_config=...)``, automatic on CUDA) or your ``torch.compile`` of a decode
            step applies: the step then reads no host value that changes per step or per prompt, and the
            cache's buffers are sized in powers of two (a prompt of the same bucket compiles nothing new).
            Replaces ``decode_graphs``. The cache holds at most its ``max_cache_len`` (``generate()`` passes
            prompt + new tokens), as a static cache does.
        warm_up: ``patch_model`` on a CUDA model runs it on a short synthetic prompt, every sparse path on, so that
            Triton compiles the kernels before the first prompt (``sparse_attn_hf.warm_up``): seconds in
            ``patch_model`` the first time a machine runs them (fractions of one from Triton's disk cache after),
            instead of in the first ``generate()``. False: the first call compiles what it runs.
        decode_local_size: local window of streaming heads in decode steps (one query token); the
            ring buffer shrinks to it when decoding starts (LServe: prefill 4096, decode 256). Capped
            at ``local_size``. A continuation after decoding sees the decode window's tokens of the
            earlier text (plus sink).
        kv_dtype: how dense heads store their sealed pages. ``"auto"`` (the default): in the model's dtype.
            ``"fp8"``: in e4m3 with a float32 scale per page and KV head (``sparse_attn_hf.kernels.fp8``), half the
            bytes of bfloat16 pages, read back in the kernels' registers; the newest 256 tokens, the streaming heads
            and the page statistics stay in the model's dtype. Each element keeps ``max(|x| 2^-4, scale 2^-10)``. CUDA needs
            compute capability 8.9 or newer (H100, L4, RTX 40xx); a CPU runs the reference.

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
    shortlist: int = 4
    page_selection: str = "auto"
    decode_local_size: int | None = None
    alpha: float | None = None
    rw: float | None = None
    r_row: float | None = None
    dense_below: int | None = None
    streaming_from: int | None = None
    cra_criterion: str = "mean"
    sample_stop_after: int = 3
    record_masks: bool = False
    decode_graphs: bool = True
    decode_compile: bool = False
    warm_up: bool = True
    kv_dtype: str = "auto"

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
        _check_int("shortlist", self.shortlist, minimum=1)
        _check_int("decode_local_size", self.decode_local_size, minimum=1)
        if self.alpha is not None and not 0.0 < float(self.alpha) <= 1.0:
            raise ValueError(f"SparseConfig.alpha={self.alpha} is outside (0, 1]; use 0.95 (the paper) or 1.0 for dense.")
        for name in ("rw", "r_row"):
            value = getattr(self, name)
            if value is not None and not 0.0 < float(value) < 1.0:
                raise ValueError(f"SparseConfig.{name}={value} is outside (0, 1); for example rw=0.08, r_row=0.025.")
        _check_int("dense_below", self.dense_below, minimum=0)
        _check_int("sample_stop_after", self.sample_stop_after, minimum=0)
        _check_int("streaming_from", self.streaming_from, minimum=0)
        if self.page_selection not in ("auto", "always", "never"):
            raise ValueError(f"SparseConfig.page_selection={self.page_selection!r} must be 'auto', 'always' or 'never'.")
        if self.kv_dtype not in ("auto", "fp8"):
            raise ValueError(f"SparseConfig.kv_dtype={self.kv_dtype!r} must be 'auto' (the model's dtype) or 'fp8'.")
        if self.cra_criterion not in ("mean", "min"):
            raise ValueError(f"SparseConfig.cra_criterion={self.cra_criterion!r} must be 'mean' or 'min'.")
        if self.token_budget is not None and self.page_size is not None and self.token_budget != UNLIMITED_BUDGET:
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
        """Return a copy with every ``None`` field the profile defines filled from ``profile`` (and validated
        again); ``streaming_from`` stays ``None`` (the cost model) unless given."""
        filled = {
            f.name: getattr(profile, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is None and hasattr(profile, f.name)
        }
        return dataclasses.replace(self, **filled)


def _check_int(name: str, value, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SparseConfig.{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"SparseConfig.{name}={value} must be >= {minimum}.")
