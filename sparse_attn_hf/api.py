"""patch_model / unpatch_model: find the family, load and check the profile, install the state."""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from . import models
from ._log import log_once, logger
from .attention import ATTENTION_NAME, sparse_attention_forward, sparse_attention_mask
from .cache import SparseCache, head_runs
from .compat import CACHE_ARG, CACHE_KEYWORDS
from .config import SparseConfig
from .decode_graph import DecodeGraph
from .ops import check_dtype
from .padding import left_padding_starts
from .parallel import KVHeadSlice, kv_head_slice
from .profile import Profile, model_shape, resolve_profile
from .record import CallRecord


@dataclass
class PatchState:
    """Everything a patched model carries: on the model and on each attention module."""

    profile: Profile
    settings: SparseConfig  # resolved: no None fields
    streaming: torch.Tensor  # bool [num_layers, KV heads of this process (heads.count)], on the CPU
    previous_attention: str
    modules: list  # weak references to the attention modules (each module holds this state: no cycle)
    heads: KVHeadSlice  # the model's KV heads this process holds (a tensor-parallel rank: its slice)
    windows: list  # per layer: None (full attention) or its native window (models.layer_windows)
    hook: object = None  # the forward pre-hook that rejects empty inputs
    _splits: dict = field(default_factory=dict)  # per (layer, device) index tensors and streaming flags
    _mask_memo: tuple | None = None
    checked_positions: object = None  # the position_ids of the current forward, once checked
    masks: dict = field(default_factory=dict)  # layer -> last SampleAttention mask (SparseConfig.record_masks)
    sample_choices: dict = field(default_factory=dict)  # layer -> last SampleAttention density, cost, sparse?
    record: CallRecord = field(default_factory=CallRecord)  # what the last call ran (``record.last_call``)

    def window(self, layer: int) -> int | None:
        """``layer``'s native sliding window (a hybrid model's window layer), or None (full attention)."""
        return self.windows[layer]

    def rule(self, layer: int) -> tuple[int, int, int]:
        """(sink, local window, decode window) of ``layer``'s streaming heads: the settings' on a full-attention
        layer; (0, window, window) on a native window layer, whose every head streams (``models``)."""
        window = self.window(layer)
        if window is None:
            local = self.settings.local_size
            return self.settings.sink_size, local, min(self.settings.decode_local_size, local)
        return 0, window, window

    def head_split(self, layer: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(dense KV head indices, streaming KV head indices) of ``layer``, on ``device`` (cached)."""
        key = (layer, str(device))
        if key not in self._splits:
            dense, stream = self.head_lists(layer)
            self._splits[key] = (torch.tensor(dense, dtype=torch.long, device=device),
                                 torch.tensor(stream, dtype=torch.long, device=device))
        return self._splits[key]

    def head_tables(self, layer: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dense KV heads, streaming KV heads, kind int32 [Hkv] (1 streaming), slot int32 [Hkv] (index among
        its kind)) of ``layer`` on ``device``: built once per model and device, shared by every SparseCache
        (a host-to-device copy per layer and call would synchronize the stream each time)."""
        key = ("tables", layer, str(device))
        if key not in self._splits:
            dense, stream = self.head_lists(layer)
            kind = [0] * (len(dense) + len(stream))
            slot = list(kind)
            for index, head in enumerate(dense):
                slot[head] = index
            for index, head in enumerate(stream):
                kind[head], slot[head] = 1, index
            self._splits[key] = (*self.head_split(layer, device),
                                 torch.tensor(kind, dtype=torch.int32, device=device),
                                 torch.tensor(slot, dtype=torch.int32, device=device))
        return self._splits[key]

    def all_streaming(self, count: int, device) -> torch.Tensor:
        """bool [count] of ones on ``device``: the flags of a call that attends streaming heads only (cached,
        not allocated per layer)."""
        key = ("all_streaming", count, str(device))
        if key not in self._splits:
            self._splits[key] = torch.ones(count, dtype=torch.bool, device=device)
        return self._splits[key]

    def head_lists(self, layer: int) -> tuple[list[int], list[int]]:
        """(dense KV heads, streaming KV heads) of ``layer`` as Python lists (known on the host)."""
        labels = self.streaming[layer].tolist()
        return ([h for h, s in enumerate(labels) if not s], [h for h, s in enumerate(labels) if s])

    def dense_runs(self, layer: int) -> list[tuple[int, int]]:
        """The dense KV heads of ``layer`` as runs [start, stop) of consecutive heads (cached): gathers and
        scatters by slices, which copy at full bandwidth where ``index_select`` does not."""
        key = ("runs", layer)
        if key not in self._splits:
            self._splits[key] = [(first, end) for first, end, _ in head_runs(self.head_lists(layer)[0])]
        return self._splits[key]

    def kv_start_for(self, attention_mask, batch: int, length: int, device) -> torch.Tensor:
        """Left-padding starts of a forward without SparseCache, computed once per mask object and device
        (layers of a model spread over devices by ``device_map`` run on their own device)."""
        if attention_mask is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        memo = self._mask_memo
        if memo is not None and memo[0] is attention_mask and memo[1] == length and memo[2].device == device:
            return memo[2]
        starts = left_padding_starts(attention_mask, batch, length, device)
        self._mask_memo = (attention_mask, length, starts)
        return starts


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sparse_attention_mask)


def patch_model(model, profile=None, config: SparseConfig | None = None):
    """Make ``model`` run sparse attention; returns ``model`` (patched in place).

    Args:
        model: a supported ``*ForCausalLM`` (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Phi-3, InternLM3, GLM-4; the
            hybrid Gemma 2, Gemma 3, GPT-OSS, Ministral, Exaone 4: ``models``).
        profile: ``None`` (the shipped profile made for this model), a path to a profile file, or a
            :class:`Profile` (for example ``Profile.all_dense(model)``).
        config: :class:`SparseConfig` overriding the profile's settings.

    ``model.generate()`` then builds a :class:`SparseCache` when the caller passes no cache; a cache
    the caller passes is used as given. ``unpatch_model`` undoes everything.

    Example:
        >>> patch_model(model)
        >>> out = model.generate(**inputs, max_new_tokens=32)
    """
    if getattr(model, "_sparse_attn_state", None) is not None:
        raise ValueError("this model is already patched: call unpatch_model(model) before patching it again.")
    family = models.family_for(model)
    check_dtype(model.dtype)
    heads = kv_head_slice(model, model_shape(model)["num_kv_heads"])  # tensor parallelism: this rank's heads
    profile = resolve_profile(model, profile)
    settings = (config or SparseConfig()).resolve(profile)
    modules = models.attention_modules(model)
    if len(modules) != profile.num_layers:
        raise ValueError(f"found {len(modules)} attention modules, the profile has {profile.num_layers} layers.")
    _register()
    labels = profile.streaming_heads(settings.streaming_fraction)  # chosen over all heads, then sliced
    windows = models.layer_windows(model.config)
    chosen = int(labels[:, heads.start : heads.stop].sum())
    for layer, window in enumerate(windows):
        if window is not None:  # a native window layer: every head streams with sink 0 and local = window
            labels[layer] = True
    state = PatchState(
        profile=profile,
        settings=settings,
        streaming=labels[:, heads.start : heads.stop].clone(),
        windows=windows,
        previous_attention=model.config._attn_implementation,
        modules=[weakref.ref(module) for module in modules],
        heads=heads,
    )
    covered = [i for i, window in enumerate(windows) if window is None]
    if heads.sharded:
        log_once(f"sparse_attn_hf: {heads.describe()}; {chosen} of its "
                 f"{len(covered) * heads.count} (layer, KV head) pairs of full-attention layers stream.")
    for module in modules:
        module._sparse_attn_state = state
    model.set_attn_implementation(ATTENTION_NAME)
    model._sparse_attn_state = state
    state.hook = model.register_forward_pre_hook(_reject_empty_input, with_kwargs=True)
    model.generate = _generate_with_sparse_cache(model)
    logger.log(
        logging.INFO,
        "sparse_attn_hf: patched %s (%s family): %d of %d KV heads of full-attention layers stream (sink %d, "
        "local %d)%s.", type(model).__name__, family.name, chosen, len(covered) * heads.count, settings.sink_size,
        settings.local_size, "" if len(covered) == len(windows) else
        f"; its {len(windows) - len(covered)} window layers keep their native window (ring of the window's size)",
    )
    return model


def unpatch_model(model):
    """Undo ``patch_model``: the previous attention implementation, no state, the class's generate."""
    state = getattr(model, "_sparse_attn_state", None)
    if state is None:
        raise ValueError("this model is not patched by sparse_attn_hf.")
    model.set_attn_implementation(state.previous_attention)
    state.hook.remove()
    for ref in state.modules:
        module = ref()
        if module is not None and getattr(module, "_sparse_attn_state", None) is state:
            del module._sparse_attn_state
    del model._sparse_attn_state
    if getattr(model.__dict__.get("generate"), "_sparse_attn_hf", False):
        del model.generate
    return model


@contextlib.contextmanager
def patched(model, profile=None, config: SparseConfig | None = None):
    """``with patched(model): ...`` patches for the block and always unpatches after it."""
    patch_model(model, profile, config)
    try:
        yield model
    finally:
        unpatch_model(model)


def _reject_empty_input(module, args, kwargs):
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if inputs is not None and inputs.ndim >= 2 and inputs.shape[1] == 0:
        raise ValueError("empty input (0 tokens): pass at least one token.")


def _generate_with_sparse_cache(model):
    """``model.generate`` that builds a SparseCache when the caller passes no cache, and marks the decoding
    loop of a SparseCache (one-token forwards past the prompt) as decode steps. A cache given under either
    keyword (``cache``, ``past_key_values``) is passed under the one the installed Transformers takes. It holds
    the model weakly and the class's function, not a bound method: the model's own attribute makes no
    reference cycle."""
    model_ref = weakref.ref(model)
    generate = type(model).generate

    @functools.wraps(generate)
    def wrapped(*args, **kwargs):
        model = model_ref()
        generation_config = kwargs.get("generation_config") or model.generation_config
        given = next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)
        wants_cache = kwargs.get("use_cache", generation_config.use_cache) is not False
        chose_cache = kwargs.get("cache_implementation", generation_config.cache_implementation) is not None
        if given is None and wants_cache and not chose_cache:
            given = SparseCache(model, max_cache_len=_length_hint(args, kwargs, generation_config))
        for name in CACHE_KEYWORDS:
            kwargs.pop(name, None)  # one cache argument, under the installed release's name
        if given is not None:
            kwargs[CACHE_ARG] = given
        record = model._sparse_attn_state.record = CallRecord()
        if not isinstance(given, SparseCache):
            return generate(model, *args, **kwargs)
        hint = _length_hint(args, kwargs, generation_config)  # a cache passed in: room for this call too
        if hint is not None and hint > (given.sequence.capacity_hint or 0):
            given.sequence.capacity_hint = hint
        try:
            with given.decoding(prompt_end=_prompt_end(args, kwargs, given)), _decode_graphs(model, given) as why:
                return generate(model, *args, **kwargs)
        finally:
            unexplained = record.decode_steps - record.graph_steps - sum(record.eager_reasons.values())
            if unexplained > 0 and why:
                record.eager_reasons[why] += unexplained
            record.cache_bytes, record.dynamic_cache_bytes = given.nbytes(), given.dynamic_cache_nbytes()

    wrapped._sparse_attn_hf = True
    return wrapped


@contextlib.contextmanager
def _decode_graphs(model, cache: SparseCache):
    """Within the block, ``model.forward`` replays decode steps from a CUDA graph (``decode_graph``) when the
    settings allow it and the model sits on one CUDA device in one process; otherwise nothing changes, and the
    block gets why (the reason its decode steps run eagerly), else None."""
    state = model._sparse_attn_state
    devices = {p.device for p in model.parameters()}
    settings = state.settings
    why = None
    if settings.decode_compile:  # Transformers compiles the decode step instead (its steps are not counted)
        yield None
        return
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


def _length_hint(args, kwargs, generation_config) -> int | None:
    """Tokens the cache will see: prompt + new tokens - 1 (the last one is never fed back), or None."""
    inputs = _input_tensor(args, kwargs)
    max_new = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
    if inputs is not None and max_new is not None:
        return inputs.shape[1] + max_new - 1
    max_length = kwargs.get("max_length")
    return None if max_length is None else max_length - 1
