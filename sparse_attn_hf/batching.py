"""Transformers' continuous batching (``model.generate_batch``, the ``ContinuousBatchingManager``) on a patched model.

The manager accepts only its own attention implementations (``paged|eager``, ``sdpa``, flash ones) and switches a
model to one of them; a name containing "flash" cannot be registered (Transformers looks for a hub kernel of that
name). :func:`keep_sparse_attention` lets a model patched by this package keep its attention, on the CPU and on a GPU
(``ON_GPU = False`` hands a GPU manager Transformers' attention instead, with a WARNING); every other model is
switched as before. The manager then passes the attention function all scheduled requests
packed in one row, with no mask: queries [1, Hq, sum of new tokens, D], keys and values [1, Hkv, sum of (past +
new), D] read back from its paged cache, and ``cu_seq_lens_q`` / ``cu_seq_lens_k`` marking each request.
:func:`packed_requests` attends each request on its own, by the package's rule for a forward that holds the
request's whole sequence: a request's prompt is a prefill (every head dense while the window would cover most of it,
as ``generate()`` decides), a one-token step with a past is a decode step (streaming heads: sink + the decode window;
dense heads: every stored token).

A step where every request decodes takes the manager's **decode fast path** (:func:`_allow_decode_fast_path` opens
it to the package's attention; Transformers offers it to flash's kernels only): the call gets the new tokens' keys
and values and the block table instead of a read-back of every request's whole cache, and
:func:`block_table_decode_step` writes and attends in one launch per layer (the package's Triton kernel, its
reference on the CPU), each head by its kind. A decode step off that path (a request past the block table's
width) runs, where flash's variable-length kernel does (CUDA), as :func:`packed_decode_step`: three launches per
layer for all requests, no host read, where torch's ``varlen_attn`` takes grouped heads (not 2.11's); past the token
budget, where pages are selected, by the read-back row's rule below.

A step holding prompts serves its decoding requests by the fast path's rule too, on the read-back row
(:func:`packed_decode_rows`). Past the token budget every request's dense heads read the pages it selects as
``generate()`` would (``methods.batched_pages``). The manager's prefix sharing is turned off for the package's
attention (:func:`_no_prefix_sharing`), and a request it recomputes for want of cache is said once
(:func:`_say_soft_resets`). Not yet (issue 33): giving back the streaming heads' blocks, prompt
chunks without the per-request loop (``cu_seq_lens`` are read on the host once per forward there).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import torch

from . import ops
from ._log import warn_once
from .methods.batched_pages import BatchedPages, selects_past
from .state import ATTENTION_NAME


ON_GPU = True  # the package's attention in the manager on a GPU too (False: Transformers' own there, said once)
PREFIX_SHARING = False  # let the manager share cached blocks between a patched model's requests (_no_prefix_sharing)
MAX_FAST_PATH_TOKENS = 1 << 20  # the block table's width: [requests, tokens / page] int32 (16 MiB at 1024 x 1M)

_BATCHING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "read_index", "write_index",
                  "block_table", "logits_indices", "logits_processor_args", "position_ids")


@dataclass(frozen=True)
class Request:
    """One request of a packed continuous-batching call: a decode step (one new token after a past) or a prefill
    (its prompt, whole when ``first`` is 0)."""

    decode: bool
    first: int


def keep_sparse_attention() -> None:
    """Let ``ContinuousBatchingManager`` keep the attention of a model patched by this package (idempotent; other
    models are switched as Transformers does). A no-op where Transformers has no such switch (releases before it)."""
    try:
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
    except ImportError:
        return
    original = getattr(ContinuousBatchingManager, "switch_to_cb_friendly_attn", None)
    if original is None or getattr(original, "_sparse_attn_hf", False):  # an older release, or done already
        return

    def switch_to_cb_friendly_attn(self, model, auto_switch_to_flash: bool = True) -> None:
        state = getattr(model, "_sparse_attn_state", None)
        if state is not None and state.active:
            state.batched_pages = None  # a new manager (or a new run of one): its cache's pages hold other requests
            if model.device.type != "cuda" or ON_GPU:
                return  # the package's attention serves packed requests (packed_requests)
            warn_once("sparse_attn_hf: continuous batching on a GPU runs Transformers' own attention, as "
                      "sparse_attn_hf.batching.ON_GPU is False; generate() keeps the sparse path. ON_GPU = True "
                      "(the default) serves it sparsely (3.5x-4.9x stock's tokens per second on an H100).")
            model.set_attn_implementation("sdpa")  # the manager refuses names it does not know; from sdpa it may
            original(self, model, auto_switch_to_flash)  # go on to flash, as for any model
            self._original_attn_impl = ATTENTION_NAME  # what the manager puts back when it stops
            return
        original(self, model, auto_switch_to_flash)

    switch_to_cb_friendly_attn._sparse_attn_hf = True
    ContinuousBatchingManager.switch_to_cb_friendly_attn = switch_to_cb_friendly_attn
    _allow_decode_fast_path()
    _plan_no_attention_mask()
    _no_prefix_sharing()
    _say_soft_resets()
    _name_batch_requests()


_BATCH = threading.local()  # the manager's loop thread: the requests of the batch it prepared last, the ones it freed


def _name_batch_requests() -> None:
    """Record, as the manager prepares each batch (on the host, in its loop thread, just before that batch's
    forward), its requests' ids and lengths in the order of the packed rows, and the ids whose blocks it frees: what
    page selection keeps each request's selection under (``methods.batched_pages``)."""
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
        from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs
    except ImportError:
        return
    prepare = getattr(ContinuousBatchingIOs, "prepare_batch_tensors", None)
    free = getattr(PagedAttentionCache, "free_blocks", None)
    if prepare is None or free is None or getattr(prepare, "_sparse_attn_hf", False):
        return

    def prepare_batch_tensors(self, requests_in_batch, *args, **kwargs):
        try:
            _BATCH.requests = [(future.state.request_id, future.state.position_offset + future.query_length)
                               for future in requests_in_batch]
        except AttributeError:  # another release's request objects: no names, no selection
            _BATCH.requests = None
        return prepare(self, requests_in_batch, *args, **kwargs)

    def free_blocks(self, request_id, *args, **kwargs):
        _freed().add(request_id)
        return free(self, request_id, *args, **kwargs)

    prepare_batch_tensors._sparse_attn_hf = free_blocks._sparse_attn_hf = True
    ContinuousBatchingIOs.prepare_batch_tensors = prepare_batch_tensors
    PagedAttentionCache.free_blocks = free_blocks


def _freed() -> set:
    """The ids whose blocks the manager freed since page selection last looked (it empties the set)."""
    freed = getattr(_BATCH, "freed", None)
    if freed is None:
        freed = _BATCH.freed = set()
    return freed


def _batch_requests() -> list | None:
    """(id, length) of this forward's requests in row order, as the manager prepared them (None: not known)."""
    return getattr(_BATCH, "requests", None)


def _say_soft_resets() -> None:
    """Say once when the manager, short of cache, evicts a request of a patched model and will prefill its prompt and
    generated tokens again (a *soft reset*; one copied to its CPU pool keeps its keys): the generated tokens' keys and
    values are then made by the prompt's rule, not the decode steps' that made them, so its next tokens may differ
    from its ``generate()`` (stock's recompute matches up to rounding)."""
    try:
        from transformers.generation.continuous_batching.offloading_manager import OffloadingManager
    except ImportError:
        return
    original = getattr(OffloadingManager, "_offload_to_cpu", None)
    if original is None or getattr(original, "_sparse_attn_hf", False):
        return

    def _offload_to_cpu(self, victims, *args, **kwargs):
        kept = original(self, victims, *args, **kwargs)
        config = getattr(getattr(self, "cache", None), "config", None)
        if len(kept) < len(victims) and getattr(config, "_attn_implementation", None) == ATTENTION_NAME:
            warn_once("sparse_attn_hf: continuous batching ran short of cache and will recompute an evicted request "
                      "(a soft reset): its generated tokens are attended again by the prompt's rule, so its answer "
                      "may differ from its generate() from there. A larger cache (max_memory_percent, num_blocks) or "
                      "a CPU pool (cpu_offload_space) avoids it.")
        return kept

    _offload_to_cpu._sparse_attn_hf = True
    OffloadingManager._offload_to_cpu = _offload_to_cpu


def _no_prefix_sharing() -> None:
    """Turn off the manager's prefix sharing (``allow_block_sharing``, on by default) for the package's attention.
    The manager shares a cached block with any request whose tokens hash the same, which holds for exact attention
    only: under the package's rules a block's keys and values depend on how its tokens were attended (generated
    tokens by the decode step's window and selected pages, a prompt by rules that look at its whole length), so a
    request given another's blocks would get answers that its own ``generate()`` does not give. Said once, as a
    multi-turn workload recomputes the prefixes stock would share; ``PREFIX_SHARING = True`` lets it share."""
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
    except ImportError:
        return
    original = PagedAttentionCache.__init__
    if getattr(original, "_sparse_attn_hf", False):
        return

    def __init__(self, config, continuous_batching_config, *args, **kwargs) -> None:
        if (getattr(config, "_attn_implementation", None) == ATTENTION_NAME and not PREFIX_SHARING
                and getattr(continuous_batching_config, "allow_block_sharing", False)):
            warn_once("sparse_attn_hf: continuous batching runs without prefix sharing on a patched model: a cached "
                      "block's keys and values depend on the sparse rule that made them, so sharing it would change "
                      "answers against generate(). Shared prompts are recomputed; sparse_attn_hf.batching."
                      "PREFIX_SHARING = True shares them anyway.")
            continuous_batching_config = copy.copy(continuous_batching_config)
            continuous_batching_config.allow_block_sharing = False
        original(self, config, continuous_batching_config, *args, **kwargs)

    __init__._sparse_attn_hf = True
    PagedAttentionCache.__init__ = __init__


def _plan_no_attention_mask() -> None:
    """The manager builds no attention mask for the package's attention (it reads ``cu_seq_lens``), but its memory
    planner, which knows flash alone as maskless, sets aside room for one ([M, cache tokens + M] in the model's
    dtype: gigabytes at long contexts) and gives the cache that much less. Plan the cache as for flash."""
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler
    except ImportError:
        return
    original = PagedAttentionMemoryHandler.__init__
    if getattr(original, "_sparse_attn_hf", False):
        return

    def __init__(self, config, *args, **kwargs) -> None:
        original(self, config, *args, **kwargs)
        if config._attn_implementation == ATTENTION_NAME:
            self.num_attention_masks = 0

    __init__._sparse_attn_hf = True
    PagedAttentionMemoryHandler.__init__ = __init__


def _allow_decode_fast_path() -> None:
    """Let the manager's decode fast path (a step of one-token requests handed to the attention with the block table:
    no read-back of the cache) run the package's attention, which Transformers offers to flash's kernels only; and,
    unless the user set ``max_blocks_per_request``, size the block table for the model's whole context (the
    fallback of 32 pages of 256 would leave every request past 8K tokens on the read-back path)."""
    try:
        from transformers.generation.continuous_batching import initialization
    except ImportError:
        return
    original = getattr(initialization, "ensure_decode_fast_path_is_available", None)
    if original is None or getattr(original, "_sparse_attn_hf", False):
        return

    def ensure_decode_fast_path_is_available(config, cb_config, user_requested: bool) -> None:
        supported = all(initialization.ATTN_TYPE_TO_ALLOCATOR[kind].supports_block_table
                        for kind in initialization.group_layers_by_attn_type(config))
        if config._attn_implementation != ATTENTION_NAME or not supported or cb_config.max_blocks_per_request == 0:
            return original(config, cb_config, user_requested)
        if not user_requested:
            context = min(getattr(config, "max_position_embeddings", 0) or 0, MAX_FAST_PATH_TOKENS)
            cb_config.max_blocks_per_request = max(cb_config.max_blocks_per_request,
                                                   -(-context // cb_config.page_size) + 1)

    ensure_decode_fast_path_is_available._sparse_attn_hf = True
    initialization.ensure_decode_fast_path_is_available = ensure_decode_fast_path_is_available


_READ = threading.local()  # per thread: each manager runs its own loop


def _on_host(layer: int | None, lengths) -> list[int]:
    """``lengths`` (the forward's ``cu_seq_lens``) as a host list, read once per forward and tensor: a forward calls
    its layers in order with the same tensors (a hybrid model has one per layer type), so a layer index that does
    not grow starts a new forward and the lists read before are dropped (no layer index: read every time)."""
    if layer is None:
        return lengths.tolist()
    if layer <= getattr(_READ, "layer", -1):
        _READ.lists = {}
    _READ.layer = layer
    lists = getattr(_READ, "lists", None)
    if lists is None:
        lists = _READ.lists = {}
    seen = lists.get(id(lengths))
    if seen is None or seen[0] is not lengths:
        seen = lists[id(lengths)] = (lengths, lengths.tolist())
    return seen[1]


def packed_requests(attend, module, query, key, value, scaling, kwargs: dict, decode_rows=None):
    """The attention of a packed continuous-batching call: each request attended on its own by ``attend`` (the
    package's attention function, given ``request=Request(...)``), written into its rows; or, for the call's decode
    steps, all at once by ``decode_rows([(query row, first key, length), ...])`` where given and it serves them
    (None: it does not). Returns (output [1, sum of new tokens, Hq, D], None)."""
    if query.shape[0] != 1:
        raise ValueError(f"a continuous-batching call packs its requests in one row, got a batch of {query.shape[0]}.")
    layer = getattr(module, "layer_idx", None)
    cu_q = _on_host(layer, kwargs["cu_seq_lens_q"])  # host reads, once per forward (issue 33: none for the
    cu_k = _on_host(layer, kwargs["cu_seq_lens_k"])  # manager's CUDA graphs)
    positions = kwargs.get("position_ids")
    rest = {name: item for name, item in kwargs.items() if name not in _BATCHING_KEYS}
    out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    steps = [(cu_q[r], cu_k[r], cu_k[r + 1] - cu_k[r], r) for r in range(len(cu_q) - 1)
             if cu_q[r + 1] - cu_q[r] == 1 and cu_k[r + 1] - cu_k[r] > 1]
    served = decode_rows(steps) if steps and decode_rows is not None else None
    if served is not None:
        out[0, [q0 for q0, _, _, _ in steps]] = served
    for r in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[r], cu_q[r + 1], cu_k[r], cu_k[r + 1]
        if q1 == q0:  # a place the manager pads its request count with
            continue
        first = (k1 - k0) - (q1 - q0)
        request = Request(decode=q1 - q0 == 1 and first > 0, first=first)
        if request.decode and served is not None:
            continue
        request_positions = None if positions is None else positions[:, q0:q1]
        out[:, q0:q1] = attend(module, query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], None, scaling,
                               position_ids=request_positions, request=request, **rest)[0]
    return out, None


def packed_decode_rows(state, module, query, key, value, terms, kwargs: dict, steps: list) -> torch.Tensor | None:
    """The decode steps of a packed call that also holds a prompt, all at once by the fast path's rule
    (``ops.block_table_decode``, page selection included): each request's keys, read back into the call's row, are
    its pages of one token (``steps``: (query row, first key, length, request index) per request). Returns
    [len(steps), Hq, D], or None where it does not serve (a native window layer; a model of several cache groups)."""
    layer = module.layer_idx
    read = kwargs.get("read_index")
    if state.window(layer) is not None or not isinstance(read, (list, tuple)) or len(read) != 1:
        return None
    device = query.device
    rows = torch.tensor([q0 for q0, _, _, _ in steps], device=device)
    first = torch.tensor([k0 for _, k0, _, _ in steps], device=device)
    lengths = torch.tensor([n for _, _, n, _ in steps], device=device)
    q = query[0, :, rows].transpose(0, 1)  # [R, Hq, D]
    k_pages, v_pages = key[0].transpose(0, 1)[:, None], value[0].transpose(0, 1)[:, None]  # [T, 1, Hkv, D]: views
    last = first + lengths - 1
    new_key, new_value = k_pages[last, 0], v_pages[last, 0]  # the step's tokens, already in the row
    table = (first[:, None] + torch.arange(max(n for _, _, n, _ in steps), device=device)).clamp(max=key.shape[2] - 1)
    cu_k = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    named = _batch_requests()
    requests = None  # the steps' requests, where the manager's names agree with the lengths read here
    if named is not None and all(r < len(named) and named[r][1] == n for _, _, n, r in steps):
        requests = [named[r] for _, _, _, r in steps]
    selection = _pages(state).selection(state, layer, q, k_pages, table, new_key, terms, requests, _freed())
    _, _, kind, _ = state.head_tables(layer, device)
    sink, _, window = state.rule(layer)
    return ops.block_table_decode(q, new_key, new_value, k_pages, v_pages, table.to(torch.int32), cu_k, kind,
                                  sink=sink, window=window, terms=terms, selection=selection)


def note_forward(state, module, query) -> None:
    """Every packed call, whatever path serves it: the page selections count the manager's forwards by it."""
    _pages(state).note(module.layer_idx, query.device)


def _pages(state) -> BatchedPages:
    """The patched model's page selections between batched decode steps (made on first use)."""
    if state.batched_pages is None:
        state.batched_pages = BatchedPages()
    return state.batched_pages


def decode_only(query, kwargs: dict) -> bool:
    """Whether a packed call holds one query per request (every request a decode step; a one-token prompt attends
    to its one key either way), known from shapes alone."""
    return query.shape[2] == kwargs["cu_seq_lens_q"].shape[0] - 1 and kwargs.get("max_length_k") is not None


def packed_decode_step(state, module, query, key, value, terms, kwargs: dict) -> torch.Tensor | None:
    """A decode step of every packed request in three variable-length launches, no host read (the lengths stay on
    the device; the longest is the manager's ``max_length_k``): every head over all its request's keys, the
    streaming heads again over the decode window and over the sink keys before it, merged by log-sum-exp, each
    head kind's rows taken from its own result. The rule of :func:`packed_requests`' decode steps (streaming heads:
    sink + decode window; dense heads: every token). Returns [1, R, Hq, D], or None where it does not apply (a
    native window layer, logit terms flash lacks, or a request past the token budget where decode steps select
    pages: :func:`packed_decode_rows` serves those, selection included)."""
    layer = module.layer_idx
    max_k = int(kwargs["max_length_k"])
    if state.window(layer) is not None or not terms.plain or selects_past(state.settings, query.device, max_k):
        return None
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]  # cu_q: 0, 1, ..., R (one query each)
    q = query[0].transpose(0, 1)  # [R, Hq, D]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T_k, Hkv, D]: the manager's own layout, no copy
    out, _ = ops.varlen_attention(q, k, v, cu_q, cu_k, 1, max_k, scale=terms.scale)
    _, stream_idx, kind, _ = state.head_tables(layer, q.device)
    if not len(stream_idx):
        return out.unsqueeze(0)
    sink, _, window = state.rule(layer)
    near, near_lse = ops.varlen_attention(q, k, v, cu_q, cu_k, 1, max_k, scale=terms.scale, window=(window - 1, 0))
    if sink:
        # each request's first min(sink, length - window) keys: those the window does not hold
        lengths = cu_k[1:] - cu_k[:-1]
        used = (lengths - window).clamp(0, sink)
        slots = (cu_k[:-1, None] + torch.arange(sink, device=q.device)).clamp(max=k.shape[0] - 1).flatten()
        cu_sink = cu_q * sink
        far, far_lse = ops.varlen_attention(q, k.index_select(0, slots), v.index_select(0, slots), cu_q, cu_sink, 1,
                                            sink, scale=terms.scale, used_k=used)
        weight = torch.where((used > 0)[:, None], torch.sigmoid(far_lse - near_lse), 0.0)  # [R, Hq]
        near = torch.lerp(near.float(), far.float(), weight[..., None]).to(out.dtype)
    streaming = kind.repeat_interleave(q.shape[1] // k.shape[1]) == 1  # per query head
    return torch.where(streaming[None, :, None], near, out).unsqueeze(0)


def fast_path_call(kwargs: dict) -> bool:
    """Whether the manager handed this call its decode fast path's arguments (block table and cache pages)."""
    return kwargs.get("block_table") is not None and kwargs.get("k_cache") is not None


def block_table_decode_step(state, module, query, key, value, terms, kwargs: dict) -> torch.Tensor:
    """The manager's decode fast path: every request one new token, its key and value not yet stored. One launch
    per layer (``ops.block_table_decode``) writes them into the request's page and attends through the block
    table, each head by its kind (streaming: sink + the decode window; dense: every token, or past the token budget
    the pages its request selects, ``methods.batched_pages``), as ``generate()`` decodes; no read-back of the cache
    (a selecting request's dense keys excepted), no host read (the requests and their lengths are named by the
    batch the manager prepared). Returns [1, R, Hq, D]."""
    layer = module.layer_idx
    if state.window(layer) is not None:  # the manager gives window layers no block table
        raise RuntimeError(f"layer {layer} has a native sliding window: the decode fast path does not serve it.")
    _, _, kind, _ = state.head_tables(layer, query.device)
    sink, _, window = state.rule(layer)
    q = query[0].transpose(0, 1)  # [R, Hq, D]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # the new tokens [R, Hkv, D]
    selection = _pages(state).selection(state, layer, q, kwargs["k_cache"], kwargs["block_table"], k, terms,
                                        _batch_requests(), _freed())
    out = ops.block_table_decode(q, k, v, kwargs["k_cache"], kwargs["v_cache"], kwargs["block_table"],
                                 kwargs["cu_seq_lens_k"], kind, sink=sink, window=window, terms=terms,
                                 selection=selection)
    return out.unsqueeze(0)
