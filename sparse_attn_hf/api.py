"""patch_model / unpatch_model: find the family, load and check the profile, install the state.

Patching is atomic: every check runs before the model is touched, and a failure while installing undoes what was
installed. The caller's config object is never edited: the patched model gets its own copy (its modules point to
it), so other models built from the same config, an assistant that shares it, or a second patched copy are left as
they were; ``unpatch_model`` puts the original object back.
"""

from __future__ import annotations

import contextlib
import copy
import logging

from transformers import AttentionInterface, AttentionMaskInterface

from . import models, warm_up
from ._log import log_once, logger
from .attention import sparse_attention_forward, sparse_attention_mask
from .config import SparseConfig
from .ops import check_dtype, check_fp8_device
from .parallel import kv_head_slice
from .profile import model_shape, resolve_profile
from .routing import ForwardRouter, SparseGenerate
from .batching import keep_sparse_attention
from .state import ATTENTION_NAME, PatchState


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sparse_attention_mask)
    keep_sparse_attention()  # model.generate_batch / the continuous-batching manager keep it (batching)


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
    # every check first: nothing below raises before the model is touched
    family = models.family_for(model)
    check_dtype(model.dtype)
    heads = kv_head_slice(model, model_shape(model)["num_kv_heads"])  # tensor parallelism: this rank's heads
    profile = resolve_profile(model, profile)
    settings = (config or SparseConfig()).resolve(profile)
    if settings.kv_dtype == "fp8":  # every device the model lives on can hold e4m3 pages
        for device in {p.device for p in model.parameters()}:
            check_fp8_device(device)
    modules = models.attention_modules(model)
    if len(modules) != profile.num_layers:
        raise ValueError(f"found {len(modules)} attention modules, the profile has {profile.num_layers} layers.")
    labels = profile.streaming_heads(settings.streaming_fraction)  # chosen over all heads, then sliced
    windows = models.layer_windows(model.config)
    chosen = int(labels[:, heads.start : heads.stop].sum())
    for layer, window in enumerate(windows):
        if window is not None:  # a native window layer: every head streams with sink 0 and local = window
            labels[layer] = True
    original = model.config
    state = PatchState(
        profile=profile,
        settings=settings,
        streaming=labels[:, heads.start : heads.stop].clone(),
        windows=windows,
        previous_attention=original._attn_implementation,
        config=copy.deepcopy(original),
        original_config=original,
        heads=heads,
    )
    try:
        _install(model, modules, state)
        warmed = warm_up.warm_up(model, state) if warm_up.wanted(model, state) else None
    except BaseException:
        _uninstall(model, state)
        raise
    if warmed is not None:
        logger.info("sparse_attn_hf: kernels compiled ahead of the first prompt in %.1f s "
                    "(SparseConfig(warm_up=False) leaves it to the first call).", warmed)
    covered = [i for i, window in enumerate(windows) if window is None]
    if heads.sharded:
        log_once(f"sparse_attn_hf: {heads.describe()}; {chosen} of its "
                 f"{len(covered) * heads.count} (layer, KV head) pairs of full-attention layers stream.")
    logger.log(
        logging.INFO,
        "sparse_attn_hf: patched %s (%s family): %d of %d KV heads of full-attention layers stream (sink %d, "
        "local %d)%s.", type(model).__name__, family.name, chosen, len(covered) * heads.count, settings.sink_size,
        settings.local_size, "" if len(covered) == len(windows) else
        f"; its {len(windows) - len(covered)} window layers keep their native window (ring of the window's size)",
    )
    return model


def _install(model, modules, state: PatchState) -> None:
    _register()
    _swap_config(model, state.original_config, state.config)
    for module in modules:
        module._sparse_attn_state = state
    model._sparse_attn_state = state
    model.set_attn_implementation(ATTENTION_NAME)  # on the model's own copy of the config
    router = ForwardRouter()
    model.register_forward_pre_hook(router.before, with_kwargs=True)
    model.register_forward_hook(router.after, with_kwargs=True, always_call=True)
    if callable(getattr(type(model), "generate", None)):  # a model with a language-modelling head
        model.generate = SparseGenerate(model)


def _uninstall(model, state: PatchState) -> None:
    """Undo whatever ``_install`` did (all of it, or the part it reached)."""
    state.installed = False  # a SparseCache made for this state now refuses to be used
    if getattr(model.__dict__.get("generate"), "_sparse_attn_hf", False):
        del model.generate
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), ForwardRouter)]:
            del hooks[key]
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    for module in model.modules():
        if getattr(module, "_sparse_attn_state", None) is state:
            del module._sparse_attn_state
    _swap_config(model, state.config, state.original_config)


def _swap_config(model, old, new) -> None:
    """Every module of ``model`` that holds the config object ``old`` gets ``new``."""
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def unpatch_model(model):
    """Undo ``patch_model``: the config object (and attention implementation) the model had, no state, no hooks,
    the class's generate."""
    state = getattr(model, "_sparse_attn_state", None)
    if state is None:
        raise ValueError("this model is not patched by sparse_attn_hf.")
    _uninstall(model, state)
    return model


@contextlib.contextmanager
def patched(model, profile=None, config: SparseConfig | None = None):
    """``with patched(model): ...`` patches for the block and always unpatches after it."""
    patch_model(model, profile, config)
    try:
        yield model
    finally:
        unpatch_model(model)
