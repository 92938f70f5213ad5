"""Model families: a table of what differs between them, and the checks before patching.

Every supported family runs its attention through Transformers' ``AttentionInterface``; its attention
modules carry ``layer_idx`` and ``num_key_value_groups`` and receive RoPE-applied queries and keys.

**Window layers.** Hybrid models (Gemma 2 and 3, GPT-OSS, Ministral, Exaone 4, Qwen2/Qwen3 with
``use_sliding_window``) mark
each layer ``full_attention`` or ``sliding_attention`` in ``config.layer_types``. A sliding layer is the
streaming rule with no sink and a local window of ``config.sliding_window`` tokens (query ``i`` sees key ``j``
when ``0 <= i - j < window``, as Transformers' ``sliding_window_overlay``) on every head: the package runs it
through the same kernels and stores it in a ring of the window's size. A profile's labels apply to the
full-attention layers only (:func:`layer_windows`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]


FAMILIES = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("internlm3", ("internlm3",)),  # Transformers maps InternLM3 onto LlamaForCausalLM
    # GLM-4 (and ChatGLM2/3 converted by sparse_attn_hf.convert) and GLM-4-0414: the model applies its
    # partial interleaved rotary embedding before the attention function, so nothing here touches it
    Family("glm", ("glm",)),
    Family("glm4", ("glm4",)),
    # Qwen3 and Qwen3-MoE normalize q and k per head (q_norm, k_norm) before RoPE, inside the model: the attention
    # function sees the same RoPE-applied queries and keys as Llama's; the MoE changes the MLP only
    Family("qwen3", ("qwen3",)),
    Family("qwen3_moe", ("qwen3_moe",)),
    # Phi-3 / Phi-4: fused qkv_proj split by the model, LongRoPE (short and long factors) applied before
    Family("phi3", ("phi3",)),
    # hybrid families: window layers between full-attention layers (layer_types); Gemma 3 scales queries by
    # query_pre_attn_scalar (passed as ``scaling``) and normalizes q and k inside the model; Exaone 4 too
    Family("ministral", ("ministral",)),
    Family("gemma3", ("gemma3_text",)),
    Family("exaone4", ("exaone4",)),
    # Gemma 2 soft-caps attention logits (the model passes softcap=attn_logit_softcapping); GPT-OSS adds a learned
    # sink logit per query head (s_aux) and its MoE changes only the MLP: terms SDPA lacks, so every head of these
    # families runs the package's kernels (or their references)
    Family("gemma2", ("gemma2",)),
    Family("gpt_oss", ("gpt_oss",)),
)

# model types that only exist as remote code, which does not run on Transformers 5.x
_NEEDS_CONVERSION = {
    "chatglm": "convert the checkpoint to GlmForCausalLM (ChatGLM2/3, original GLM-4)",
    "internlm2": "convert the checkpoint to LlamaForCausalLM (InternLM2/2.5)",
}


# families whose attention needs terms the kernels do not compute yet: what is missing, for the refusal
_NOT_YET = {
    "gemma3": "bidirectional attention within each image (the vision-language model; its text-only "
              "Gemma3ForCausalLM, model_type gemma3_text, is supported)",
}


def layer_windows(config) -> list[int | None]:
    """Per layer of ``config`` (a model config or its text config): ``None`` for full attention, or the
    window in tokens of a native sliding-window layer. A window that no input can exceed (Phi-3-128k's
    262144 against its positions) never binds: full attention."""
    config = config.get_text_config(decoder=True)
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if window is not None and window >= getattr(config, "max_position_embeddings", float("inf")):
        window = None
    types = getattr(config, "layer_types", None)
    if not types:  # no per-layer types: a window applies to every layer (Mistral's)
        return [window] * layers
    other = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise ValueError(
            f"layer types {other} of this {config.model_type} model are not supported by sparse_attn_hf (it knows "
            "full_attention and sliding_attention layers)."
        )
    return [window if kind == "sliding_attention" else None for kind in types]


def full_attention_layers(config) -> tuple[int, ...]:
    """The layers of ``config`` without a native window (those a profile covers), or ``ValueError`` where every
    layer slides (Mistral's window): there is nothing for the package to make cheaper."""
    windows = layer_windows(config)
    full = tuple(i for i, window in enumerate(windows) if window is None)
    if not full:
        raise ValueError(
            f"every layer of this {config.get_text_config(decoder=True).model_type} model attends through its own "
            f"sliding window of {windows[0]} tokens: no layer reads the whole context, so there is nothing for "
            "sparse_attn_hf to make cheaper (its KV memory is already bounded by the window); use it as it is. If "
            "your inputs are shorter than the window, it never binds: set model.config.sliding_window = None and "
            "patch again."
        )
    return full


def supported_model_types() -> list[str]:
    return [t for family in FAMILIES for t in family.model_types]


def family_for(model) -> Family:
    """The family of ``model``, or ``ValueError`` saying why it cannot be patched and what to do."""
    config = model.config.get_text_config(decoder=True)
    model_type = config.model_type
    if model_type in _NEEDS_CONVERSION:
        raise ValueError(
            f"{type(model).__name__} ({model_type}) runs its own remote attention code, which sparse_attn_hf "
            f"cannot patch: {_NEEDS_CONVERSION[model_type]} first with "
            f"`python -m sparse_attn_hf.convert {model_type} SRC DST`, load DST and patch that."
        )
    if model_type in _NOT_YET:
        raise ValueError(
            f"{type(model).__name__} ({model_type}) is not supported by sparse_attn_hf yet: its attention has "
            f"{_NOT_YET[model_type]}, which the package's kernels do not compute yet; "
            f"supported: {', '.join(supported_model_types())}."
        )
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None or not model._can_set_attn_implementation():
        raise ValueError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported by sparse_attn_hf; "
            f"supported: {', '.join(supported_model_types())}."
        )
    if getattr(config, "use_bidirectional_attention", None):
        raise ValueError(
            f"{type(model).__name__} ({model_type}) sets use_bidirectional_attention=True (an encoder): "
            "sparse_attn_hf computes causal attention only."
        )
    full_attention_layers(config)  # raises where every layer slides
    return family


def attention_modules(model) -> list:
    """The attention modules of ``model``, in layer order."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    return sorted(modules, key=lambda m: m.layer_idx)
