"""Which calls of a patched model the sparse path serves, and which run exactly as stock runs them.

A patched model serves a call sparsely wherever it can give the answer its rule defines (left padding, a
continuation, chunked prefill, beam search, sampling, a cache it built or a DynamicCache). Where it cannot, the call
runs as stock: for its duration the model's own config (``PatchState.config``, a private copy) names the attention
implementation the model had before patching, so Transformers builds stock's masks and calls stock's attention. The
user is told once, as a WARNING, why; ``last_call(model)`` records it too. Served as stock:

* attention weights requested (``output_attentions``): the package's kernels never form them;
* a 4D attention mask, or a 2D mask whose padding is not on the left (right padding, a gap inside a row);
* packed rows: ``position_ids`` that restart inside a row (several sequences back to back), except the packed calls
  of Transformers' continuous batching, which carry each request's bounds (``cu_seq_lens_q``) and are served
  sparsely (``batching``);
* a cache that returns stored slots rather than every token in order (``StaticCache`` and its kin);
* in ``generate()``: assisted decoding and prompt lookup (they roll the cache back, which a ring buffer cannot), a
  ``cache_implementation`` the package cannot honour (``offloaded``, ``quantized``, ``offloaded_static``, ...), a
  model whose attention implementation was changed after patching (``set_attn_implementation``).

A call that carries a :class:`SparseCache` cannot run as stock (stock attention cannot read it): it raises, naming
why and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from ._log import warn_once
from .cache import SparseCache
from .compat import CACHE_ARG, CACHE_KEYWORDS
from .decode_graph import DecodeGraph
from .record import CallRecord
from .state import ATTENTION_NAME

# cache_implementation values a SparseCache honours: what they ask for (every token, or windows kept for the sliding
# layers, or a preallocated cache replayed fast) it gives, with the streaming heads' memory saving on top
SPARSE_CACHE_IMPLEMENTATIONS = (None, "dynamic", "static", "sliding_window", "hybrid")
_ASSISTED = ("prompt_lookup_num_tokens", "assistant_early_exit")


# ----------------------------------------------------------------------------------------------- forward calls
def why_stock_forward(state, args, kwargs) -> str | None:
    """Why this forward of a patched model cannot be served sparsely (see the module docstring), or None. Reads the
    host only for a prefill (a decode step of a SparseCache is served without looking)."""
    cache = next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)
    if kwargs.get("output_attentions") or getattr(state.config, "output_attentions", False):
        return "attention weights were requested (output_attentions=True); the package's kernels never form them"
    if kwargs.get("cu_seq_lens_q") is not None:  # continuous batching: packed requests the attention splits (batching)
        return None
    mask = kwargs.get("attention_mask")
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if isinstance(mask, torch.Tensor) and mask.ndim == 4:
        return "a 4D attention mask (a custom mask) was passed"
    if cache is not None and not isinstance(cache, SparseCache) and not _returns_every_token(cache):
        return f"a {type(cache).__name__} stores tokens in fixed slots, which the package's attention does not read"
    q_len = inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 else None
    if isinstance(cache, SparseCache) and q_len == 1 and cache.get_seq_length() > 0:
        return None  # a decode step: padding and positions were checked when the cache was filled
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and not _left_padded(mask):
        return "the attention mask is not left padding (right padding, or a gap inside a row)"
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.shape[-1] > 1 and _restarts(positions):
        return "packed rows: position_ids restart inside a row (several sequences back to back)"
    return None


def _returns_every_token(cache) -> bool:
    """Whether every layer of ``cache`` hands attention all tokens seen, in order (DynamicCache and its kin), as
    the package's attention reads a cache-less forward; a native window layer may keep only its window."""
    from transformers.cache_utils import DynamicLayer

    return all(isinstance(layer, DynamicLayer) for layer in getattr(cache, "layers", ()))


def _left_padded(mask: torch.Tensor) -> bool:
    """Each row: zeros, then only ones (no padding at all included). One host read."""
    real = mask.to(torch.bool)
    starts = (~real).sum(-1, keepdim=True)
    return bool(torch.equal(real, torch.arange(mask.shape[-1], device=mask.device) >= starts))


def _restarts(positions: torch.Tensor) -> bool:
    """Whether some row's positions fall back (packed sequences). One host read."""
    return bool((positions[..., 1:] < positions[..., :-1]).any())


@contextlib.contextmanager
def as_stock(state, why: str):
    """Within the block the model runs stock's attention (``state.previous_attention``); the user is told once."""
    warn_once(f"sparse_attn_hf: a call runs as stock Transformers (dense attention, as before patching): {why}.")
    state.record.stock = why
    config = state.config
    config._attn_implementation = state.previous_attention
    try:
        yield
    finally:
        config._attn_implementation = ATTENTION_NAME


class ForwardRouter:
    """The forward pre-hook and hook of a patched model: rejects empty inputs, and serves as stock a forward the
    sparse path cannot (``why_stock_forward``). It reads the state from the model the hooks receive (no reference
    to it: a deep copy of the model routes with its own state)."""

    def __init__(self):
        self._open: list = []  # the as_stock blocks entered by the pre-hook, closed by the hook

    def before(self, model, args, kwargs):
        if torch.compiler.is_compiling():  # a compiled decode step (SparseConfig(decode_compile=True)): served as is
            return None
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 and inputs.shape[1] == 0:
            raise ValueError("empty input (0 tokens): pass at least one token.")
        state = model._sparse_attn_state
        state.sample_misses = 0  # SampleAttention's stop rule counts within one forward
        if not state.generating:  # a forward of the caller's own: its own record
            state.record = CallRecord()
        cache = next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)
        # the prompt this forward belongs to (attention decides dense-or-window for a short prompt from all of it)
        state.prompt_total = None if cache is None else (state.prompt_end if state.generating and state.prompt_end
                                                         else 0)
        if not state.active:
            if isinstance(cache, SparseCache):
                raise ValueError(_sparse_cache_without_sparse_attention(state))
            return None
        why = why_stock_forward(state, args, kwargs)
        if why is not None:
            if isinstance(cache, SparseCache):
                raise ValueError(f"this call cannot be served sparsely ({why}), and the SparseCache it carries can "
                                 "only be read by the package's attention: call it without the SparseCache (stock "
                                 "then serves it), or without what stops the sparse path.")
            block = as_stock(state, why)
            block.__enter__()
            self._open.append(block)
        return None

    def after(self, model, args, kwargs, output):
        if self._open and not torch.compiler.is_compiling():
            self._open.pop().__exit__(None, None, None)
        return None


def _sparse_cache_without_sparse_attention(state) -> str:
    return (f"a SparseCache can only be read by sparse_attn_hf's attention, and this model now runs "
            f"{state.config._attn_implementation!r} (set_attn_implementation after patching): create a new "
            "DynamicCache, or set_attn_implementation('sparse_attn_hf') to return to the package's attention.")


# ----------------------------------------------------------------------------------------------- generate()
class SparseGenerate:
    """``model.generate`` of a patched model: builds a SparseCache when the caller passes no cache (and none of the
    settings above sends the call to stock), marks its decoding loop, replays decode steps from a CUDA graph, and
    records the call (``last_call``). An instance attribute that ``unpatch_model`` removes; it holds the model
    weakly (no reference cycle), and a ``copy.deepcopy`` of the model gets one bound to the copy."""

    _sparse_attn_hf = True

    def __init__(self, model):
        self._model = weakref.ref(model)
        functools.update_wrapper(self, type(model).generate)

    def __deepcopy__(self, memo):
        model = self._model()
        return SparseGenerate(memo.get(id(model), model))

    def __call__(self, *args, **kwargs):
        return sparse_generate(self._model(), *args, **kwargs)


def why_stock_generate(model, state, kwargs, generation_config) -> str | None:
    """Why a ``generate()`` call of a patched model runs as stock, or None."""
    if not state.active:
        return (f"the model's attention implementation is now {state.config._attn_implementation!r} "
                "(set_attn_implementation after patching); unpatch_model(model) says so explicitly")
    if kwargs.get("assistant_model") is not None or any(
            kwargs.get(name, getattr(generation_config, name, None)) is not None for name in _ASSISTED):
        return "assisted decoding and prompt lookup roll the cache back, which a streaming head's ring cannot"
    if kwargs.get("output_attentions", generation_config.output_attentions):
        return "attention weights were requested (output_attentions=True); the package's kernels never form them"
    implementation = kwargs.get("cache_implementation", generation_config.cache_implementation)
    if implementation not in SPARSE_CACHE_IMPLEMENTATIONS:
        return (f"cache_implementation={implementation!r} asks for a cache the package does not store in (it honours "
                f"{', '.join(repr(i) for i in SPARSE_CACHE_IMPLEMENTATIONS[1:])} with its SparseCache)")
    return None


def sparse_generate(model, *args, **kwargs):
    generate = type(model).generate
    state = model._sparse_attn_state
    generation_config = kwargs.get("generation_config") or model.generation_config
    record = state.record = CallRecord()
    state.generating = True
    try:
        return _generate(model, generate, state, record, generation_config, args, kwargs)
    finally:
        state.generating = False


def _generate(model, generate, state, record, generation_config, args, kwargs):
    given = next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)
    for name in CACHE_KEYWORDS:
        kwargs.pop(name, None)  # one cache argument, under the installed release's name
    why = why_stock_generate(model, state, kwargs, generation_config)
    mask = kwargs.get("attention_mask")
    if why is None and isinstance(mask, torch.Tensor) and mask.ndim == 2 and not _left_padded(mask):
        why = "the attention mask is not left padding (right padding, or a gap inside a row)"
    if why is not None:
        if isinstance(given, SparseCache):
            raise ValueError(f"this generate() call cannot be served sparsely ({why}) and carries a SparseCache, "
                             "which only the package's attention reads: call it without the cache.")
        if given is not None:
            kwargs[CACHE_ARG] = given
        if not state.active:  # already stock's attention: nothing to switch
            warn_once(f"sparse_attn_hf: generate() runs as stock Transformers: {why}.")
            record.stock = why
            return generate(model, *args, **kwargs)
        with as_stock(state, why):
            return generate(model, *args, **kwargs)
    wants_cache = kwargs.get("use_cache", generation_config.use_cache) is not False
    if given is None and wants_cache:
        given = SparseCache(model, max_cache_len=_length_hint(args, kwargs, generation_config, None))
    if kwargs.get("cache_implementation", generation_config.cache_implementation) is not None:
        kwargs["cache_implementation"] = None  # honoured by the SparseCache (Transformers takes one or the other)
    if given is not None:
        kwargs[CACHE_ARG] = given
    if not isinstance(given, SparseCache):  # a DynamicCache of the caller's, or no cache at all
        if given is not None:
            warn_once(f"sparse_attn_hf: generate() on the caller's {type(given).__name__}: it keeps every token of "
                      "every head, so the streaming heads save no memory and decode steps select no pages and replay "
                      "no graph; let generate() build its SparseCache for those.")
        state.prompt_end = None if given is None else _prompt_end(args, kwargs, given)
        try:
            return generate(model, *args, **kwargs)
        finally:
            state.prompt_end = None
    hint = _length_hint(args, kwargs, generation_config, given)  # a cache passed in: room for this call too
    if hint is not None and hint > (given.sequence.capacity_hint or 0):
        given.sequence.capacity_hint = hint
    state.prompt_end = _prompt_end(args, kwargs, given)
    try:
        with given.decoding(prompt_end=state.prompt_end), decode_graphs(model, given) as eager:
            return generate(model, *args, **kwargs)
    finally:
        state.prompt_end = None
        unexplained = record.decode_steps - record.graph_steps - sum(record.eager_reasons.values())
        if unexplained > 0 and eager:
            record.eager_reasons[eager] += unexplained
        record.cache_bytes, record.dynamic_cache_bytes = given.nbytes(), given.dynamic_cache_nbytes()


@contextlib.contextmanager
def decode_graphs(model, cache: SparseCache):
    """Within the block, ``model.forward`` replays decode steps from a CUDA graph (``decode_graph``) when the
    settings allow it and the model sits on one CUDA device in one process; otherwise nothing changes, and the
    block gets why its decode steps run eagerly (else None)."""
    state = model._sparse_attn_state
    settings = state.settings
    if settings.decode_compile:  # Transformers compiles the decode step instead (its steps are not counted)
        yield None
        return
    devices = {p.device for p in model.parameters()}
    why = None
    if not settings.decode_graphs:
        why = "SparseConfig(decode_graphs=False)"
    elif state.heads.sharded:
        why = "tensor parallelism: graphs are per process"
    elif len(devices) != 1:
        why = "the model spans several devices"
    elif next(iter(devices)).type != "cuda":
        why = "not CUDA"
    if why is not None:
        yield why
        return
    previous = model.__dict__.get("forward")  # an instance attribute (accelerate's hooks) or the class's method
    model.forward = DecodeGraph(model, cache)
    try:
        yield None
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous


def _input_tensor(args, kwargs):
    if args:
        return args[0]
    return next((kwargs[name] for name in ("inputs", "input_ids", "inputs_embeds") if kwargs.get(name) is not None),
                None)


def _prompt_end(args, kwargs, cache: SparseCache) -> int | None:
    """Slots the prompt fills: the attention mask covers the whole sequence (Transformers' rule for a
    continuation), else the inputs do. Forwards up to there are prefill, however they are chunked."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        return mask.shape[-1]
    inputs = _input_tensor(args, kwargs)
    if inputs is None:
        return None
    return max(inputs.shape[1], cache.get_seq_length() + 1)


def _length_hint(args, kwargs, generation_config, cache) -> int | None:
    """Tokens the cache will see: prompt + new tokens - 1 (the last one is never fed back), or None. The prompt of
    a continuation is the whole sequence (its attention mask, or its inputs)."""
    inputs = _input_tensor(args, kwargs)
    max_new = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
    if inputs is not None and max_new is not None:
        prompt = inputs.shape[1] if cache is None else _prompt_end(args, kwargs, cache)
        return prompt + max_new - 1
    max_length = kwargs.get("max_length")
    return None if max_length is None else max_length - 1


__all__ = ["ForwardRouter", "SparseGenerate", "as_stock", "decode_graphs", "why_stock_forward", "why_stock_generate"]
