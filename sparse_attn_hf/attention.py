"""The attention function registered with Transformers: one call per layer and forward.

Two inputs reach it:

* ``key``/``value`` tensors [B, Hkv, Lk, D] holding every token of the sequence (no cache,
  ``use_cache=False``, or a ``DynamicCache``): the layer attends to them with its head labels.
* a :class:`~sparse_attn_hf.cache.PendingKV` from a :class:`SparseCache`: the new tokens are appended
  first, then dense heads attend to the paged cache and streaming heads to sink + ring buffer.

Either way the result is the same attention (the rule of ``kernels/reference.py``); only what is
stored differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.masking_utils import flash_attention_mask

from . import ops
from .ops import LogitTerms, Visibility
from ._log import log_once
from .batching import (block_table_decode_step, decode_only, fast_path_call, note_forward, packed_decode_rows,
                       packed_decode_step, packed_requests)
from .cache import LayerKV, PendingKV, SparseLayer
from .methods.decode_step import DecodePlan
from .methods.sample_attention import SampleSettings, choose_mask, window_size
from .methods.streaming import dense_prompt
from .parallel import check_heads
from .record import LayerPrefill
from .state import ATTENTION_NAME

def sparse_attention_mask(*args, **kwargs):
    """The mask function: ``None`` when nothing is padded, else the 2D bool padding mask [B, Lkv]. A compiled
    one-token step gets ``None`` without looking (the check reads the mask on the host; decode steps take the
    padding from the cache)."""
    if torch.compiler.is_compiling():
        positions = kwargs.get("cache_position")  # Transformers before 5.24 passes positions, not q_length
        if kwargs.get("q_length", None if positions is None else positions.shape[0]) == 1:
            return None
    return flash_attention_mask(*args, **kwargs)


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers attention-interface function. Returns (output [B, Lq, Hq, D], None)."""
    state = getattr(module, "_sparse_attn_state", None)
    if state is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} is set but this module is not patched; "
            "call sparse_attn_hf.patch_model(model) (or model.set_attn_implementation('sdpa') to leave it)."
        )
    if dropout and module.training:
        raise ValueError("sparse_attn_hf is for inference: call model.eval() (attention dropout is not supported).")
    if query.shape[2] == 0:
        raise ValueError("empty input (0 tokens): pass at least one token.")
    # the scale, and terms of some families that SDPA lacks: learned sinks (GPT-OSS passes s_aux, float [Hq]) and
    # soft-capped logits (Gemma 2 passes softcap); the package's kernels compute both
    terms = LogitTerms(scaling if scaling is not None else query.shape[-1] ** -0.5, kwargs.get("softcap"),
                       kwargs.get("s_aux"))
    if kwargs.get("cu_seq_lens_q") is not None and not isinstance(key, PendingKV):
        # Transformers' continuous batching: requests packed in one row; a decode step of all of them in a few
        # variable-length launches where flash's kernel runs (CUDA), else each request attended on its own
        note_forward(state, module, query)
        if fast_path_call(kwargs):  # the manager's decode fast path: new tokens only, the pages through the table
            return block_table_decode_step(state, module, query, key, value, terms, kwargs), None
        if ops.varlen_available(query) and decode_only(query, kwargs):
            out = packed_decode_step(state, module, query, key, value, terms, kwargs)
            if out is not None:
                return out, None
        return packed_requests(sparse_attention_forward, module, query, key, value, scaling, kwargs,
                               lambda steps: packed_decode_rows(state, module, query, key, value, terms, kwargs, steps))
    request = kwargs.pop("request", None)  # one request of a packed call (batching.Request)
    batch, q_len = query.shape[0], query.shape[2]
    kv_heads = (key.key if isinstance(key, PendingKV) else key).shape[1]
    if kv_heads != state.streaming.shape[1] or query.shape[1] != kv_heads * module.num_key_value_groups:
        check_heads(state.heads, module, query.shape[1], kv_heads)  # raises: labels would land on wrong heads
    window_layer = state.window(module.layer_idx) is not None  # a hybrid model's native window layer
    if isinstance(key, PendingKV):
        layer: SparseLayer = key.layer
        sequence = layer.sequence
        if sequence.owner is not state:
            raise ValueError(
                "this SparseCache was made for another model or an earlier patch: create SparseCache(model) "
                "for the model you call."
            )
        if q_len == 1 and sequence.decoding and layer.is_compileable and torch.compiler.is_compiling():
            # Transformers' compiled decode step (SparseConfig(decode_compile=True)): nothing here reads a host
            # value that changes per step or per prompt (the padding comes from the prefill's kv_start)
            if sequence.kv_start is None:
                raise ValueError("a compiled decode step needs a prefill on this SparseCache first.")
            visible = Visibility(sequence.kv_start.to(query.device))
            return DecodePlan.of(layer).run(layer, query, key, visible, terms).unsqueeze(1), None
        first = layer.seen
        kv_start = sequence.resolve_kv_start(attention_mask, layer.batch, first, q_len, layer.device)
        if sequence.is_decode_step(first, q_len):  # page selection for dense heads, decode window for streaming
            return DecodePlan.of(layer).run(layer, query, key, Visibility(kv_start), terms).unsqueeze(1), None
        dense_idx, stream_idx = layer.dense_idx, layer.stream_idx
        dense_prompt = _dense_prompt(state, window_layer, len(stream_idx), first, q_len, state.prompt_total)
        # a prompt run dense keeps all of it for its streaming heads until it ends (a later chunk attends to it)
        kv = layer.append(key.key, key.value, kv_start, ring=dense_prompt or None)
        DecodePlan.of(layer).reset(layer)  # new prompt tokens: the next decode step selects anew
        padded = sequence.max_kv_start > 0
        # a first prefill: the new tokens are the whole sequence, every head, laid out as stock has them
        whole, every_key, every_value = first == 0, key.key, key.value
    else:
        k_len = key.shape[2]
        # a native window layer may get only its window's keys (Transformers' sliding cache layers): the rule is
        # the same in the keys' own slots, so its positions are not checked against the keys
        if (not window_layer and attention_mask is None and request is None
                and kwargs.get("position_ids") is not state.checked_positions):
            _check_positions(kwargs.get("position_ids"), k_len)  # once per forward, not per layer
            state.checked_positions = kwargs.get("position_ids")
        first = k_len - q_len
        kv_start = state.kv_start_for(attention_mask, batch, k_len, query.device)
        dense_idx, stream_idx = state.head_split(module.layer_idx, query.device)
        # a request of a packed call: its prompt whole (first 0) decides as a forward without a cache does
        total = state.prompt_total if request is None else (None if request.first == 0 else 0)
        dense_prompt = 0 if request is not None and request.decode else _dense_prompt(
            state, window_layer, len(stream_idx), first, q_len, total)
        kv = None  # split below, unless every head runs dense
        padded = attention_mask is not None
        whole, every_key, every_value = True, key, value
    settings = state.settings
    sink, local, decode_local = state.rule(module.layer_idx)
    if request is not None and request.decode:  # a decode step of a packed call: streaming heads' decode window
        local = decode_local
    visible = Visibility(kv_start, sink=sink, local=local, q_first=first)
    sample, sample_note = _sample_settings(state, module.layer_idx, q_len, first + q_len)
    if window_layer:  # its window must bind somewhere for the streaming kernel to be needed; else dense is exact
        stream_pays = first + q_len > local
    else:
        stream_pays = bool(len(stream_idx)) and not dense_prompt
        if dense_prompt:  # a later chunk of a prompt run dense: its streaming heads see every earlier token too
            visible = visible.but(local=max(local, dense_prompt))
    record = state.record.prefill
    if sample is None and whole and not stream_pays:
        # every head dense: one SDPA call on K/V as they came (no gathered queries, no layout copy)
        record[module.layer_idx] = LayerPrefill(
            0, kv_heads, note=sample_note if not len(stream_idx) else
            "a short prompt ran every head dense (exact): the window would cover most of it (sparse_attn_hf.cost; "
            "SparseConfig(streaming_from=0) forces the window)")
        return ops.dense_attention(query, every_key, every_value, terms, kv_start=kv_start, padded=padded,
                                   shapes_vary=request is not None), None
    if kv is None:
        kv = LayerKV.split(key, value, dense_idx, stream_idx)
    stream_flags = state.all_streaming(len(stream_idx), query.device)
    runs = state.dense_runs(module.layer_idx)
    call = _Call(visible.but(streaming=stream_flags), terms, settings.query_tile, padded, sample, request is not None)
    out = _prefill(query, kv, runs, stream_idx, call)
    record[module.layer_idx] = _layer_record(state, module.layer_idx, 0 if dense_prompt else len(stream_idx),
                                             kv_heads - len(stream_idx), sample, sample_note)
    return out, None


def _layer_record(state, layer: int, streaming: int, dense: int, sample, note: str | None = None) -> LayerPrefill:
    """What a prefill forward of ``layer`` ran (``record.CallRecord``)."""
    entry = LayerPrefill(streaming, dense, note=note if dense else None)
    choice = state.sample_choices.get(layer) if sample is not None and dense else None
    if choice is not None:
        entry.density = choice["density"]
        if choice["sparse"]:
            entry.dense_method = "sample_attention"
        else:
            entry.note = "SampleAttention chose masks too dense to pay; those layers ran dense (sparse_attn_hf.cost)"
    return entry


def _dense_prompt(state, window_layer: bool, n_stream: int, first: int, q_len: int, total: int | None) -> int:
    """``methods.streaming.dense_prompt`` with this model's settings and the prompt this forward belongs to (``total``,
    as ``PatchState.prompt_total``)."""
    settings = state.settings
    return dense_prompt(total, streaming_from=settings.streaming_from, sink=settings.sink_size,
                        local=settings.local_size, window_layer=window_layer, n_stream=n_stream, first=first,
                        q_len=q_len)


_STOP_NOTE = ("SampleAttention stopped sampling in this forward after {n} layers in a row chose masks too dense to "
              "pay: its later layers ran dense without sampling (SparseConfig.sample_stop_after)")


def _sample_settings(state, layer: int, q_len: int, k_len: int) -> tuple[dict | None, str | None]:
    """(SampleAttention's settings for this call's dense heads, or None where they run dense; the record's note
    when SampleAttention's stop rule sent the layer dense)."""
    settings = state.settings
    if settings.alpha >= 1.0 or k_len < settings.dense_below:
        return None, None
    if q_len < 2:
        log_once("sparse_attn_hf: SampleAttention needs at least 2 query rows to sample; one-token steps run dense.")
        return None, None
    if window_size(settings.rw, k_len) >= k_len:
        log_once(f"sparse_attn_hf: SampleAttention's window (rw={settings.rw}) covers a {k_len}-token sequence; "
                 "it runs dense.")
        return None, None
    if settings.sample_stop_after and state.sample_misses >= settings.sample_stop_after:
        return None, _STOP_NOTE.format(n=state.sample_misses)
    return dict(state=state, layer=layer, record=settings.record_masks, settings=SampleSettings(
        settings.alpha, settings.rw, settings.r_row, settings.cra_criterion)), None


def _check_positions(position_ids, k_len: int) -> None:
    """Without padding, the last position must be the last key: anything else is a cache we cannot read."""
    if position_ids is None:
        return
    last = int(position_ids[..., -1].max()) + 1
    if last != k_len:
        raise ValueError(
            f"the keys ({k_len}) do not end at the last position ({last}): a fixed-size or sliding cache "
            "(StaticCache) or custom position_ids. Use the default cache of generate(), a DynamicCache or a "
            "SparseCache, and positions 0..n-1."
        )


@dataclass(frozen=True)
class _Call:
    """What one prefill forward of a layer attends with: what each query sees (``streaming`` one flag per streaming
    head), the logit terms, the query tile of the PyTorch paths, whether any row is padded, SampleAttention's
    settings for the dense heads (None: they run dense), whether each call has its own lengths (a request of a
    continuous-batching step: ``ops.dense_attention``'s ``shapes_vary``)."""

    visible: Visibility
    terms: LogitTerms
    tile: int
    padded: bool
    sample: dict | None
    shapes_vary: bool = False


def _dense_heads(query, key, value, call: _Call, terms: LogitTerms) -> torch.Tensor:
    """Dense heads: full causal attention (the best dense kernel at hand), or SampleAttention's window +
    stripes when ``call.sample`` and the cost model predicts that its mask pays. ``terms``: those of the heads of
    ``query``. -> [B, Lq, Hq, D], possibly a non-contiguous view."""
    sample, kv_start = call.sample, call.visible.kv_start
    if sample is not None:
        visible = Visibility(kv_start, q_first=call.visible.q_first)
        choice = choose_mask(query, key, visible, terms, sample["settings"])
        state, layer = sample["state"], sample["layer"]  # the record of the choice
        if sample["record"]:
            state.masks[layer] = choice.mask
        state.sample_choices[layer] = {"density": choice.density, "predicted_cost": choice.predicted_cost,
                                       "sparse": choice.sparse}
        state.sample_misses = 0 if choice.sparse else state.sample_misses + 1
        if choice.sparse:
            return ops.stripe_attention(query, key, value, choice.mask, terms, tile=call.tile)
        log_once(f"sparse_attn_hf: SampleAttention chose masks too dense to pay (layer {layer}: density "
                 f"{choice.density:.2f}, predicted {choice.predicted_cost:.2f}x dense attention's cost); such layers "
                 "run dense (sparse_attn_hf.cost; state.sample_choices holds every layer's choice).")
    return ops.dense_attention(query, key, value, terms, kv_start=kv_start, padded=call.padded,
                               shapes_vary=call.shapes_vary)


def _prefill(query, kv: LayerKV, dense_runs, stream_idx, call: _Call) -> torch.Tensor:
    """Dense heads through the best dense kernel, streaming heads through the sparse kernel, which reads and
    writes its heads in place. Returns [B, Lq, Hq, D]. ``dense_runs``: the dense KV heads as runs of
    consecutive heads (``PatchState.dense_runs``).

    Only the dense heads' queries are gathered and their output scattered (one copy each), and only when the
    layer has both kinds; the output buffer is allocated after the dense attention has freed its queries."""
    batch, num_heads, q_len, head_dim = query.shape
    n_dense, n_stream = sum(b - a for a, b in dense_runs), len(stream_idx)
    groups = num_heads // (n_dense + n_stream)
    terms = call.terms
    if not n_stream:
        return _dense_heads(query, kv.dense_key, kv.dense_value, call, terms)
    streaming = call.visible.but(k_pos=kv.stream_pos)
    if kv.stream_first is not None:  # sinks + consecutive slots, no padding (LayerKV): in their coordinates
        streaming = streaming.but(q_first=kv.stream_first, kv_start=torch.zeros_like(streaming.kv_start))
    if not n_dense:  # every head streams: K/V hold them all, in order
        return ops.sparse_attention(query, kv.stream_key, kv.stream_value, streaming, terms, tile=call.tile)
    picked = _gather_heads(query, dense_runs, groups)
    dense_terms = terms
    if terms.sinks is not None:  # the gathered query heads' sinks, in the same order
        dense_terms = terms.with_sinks(_gather_heads(terms.sinks.view(1, -1, 1, 1), dense_runs, groups).flatten())
    dense_out = _dense_heads(picked, kv.dense_key, kv.dense_value, call, dense_terms)
    del picked
    out = torch.empty(batch, q_len, num_heads, head_dim, dtype=query.dtype, device=query.device)
    by_kv_head, done = out.unflatten(2, (-1, groups)), 0
    for a, b in dense_runs:  # one slice copy per run of consecutive dense heads
        by_kv_head[:, :, a:b].copy_(dense_out[:, :, done * groups : (done + b - a) * groups].unflatten(2, (-1, groups)))
        done += b - a
    del dense_out
    streaming = streaming.but(heads=stream_idx, groups=groups, key_all_heads=kv.stream_all_heads)
    return ops.sparse_attention(query, kv.stream_key, kv.stream_value, streaming, terms, tile=call.tile, out=out)


def _gather_heads(query: torch.Tensor, runs, groups: int) -> torch.Tensor:
    """The query heads of the KV-head ``runs`` ([start, stop), ``groups`` query heads each) of query
    [B, Hq, L, D] -> contiguous [B, n x groups, L, D], the layout of the cache's K/V, which cuDNN wants for
    all three (benchmarks/results/prefill_gathers.json: a transposed query costs it more than this copy). One
    concatenation of slices: a single copy, where ``index_select`` on the heads ran at a third of the
    bandwidth."""
    parts = [query[:, a * groups : b * groups] for a, b in runs]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=1)


__all__ = ["ATTENTION_NAME", "sparse_attention_forward", "sparse_attention_mask"]
