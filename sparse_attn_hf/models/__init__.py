"""Model families: a table of what differs between them, and the checks before patching.

Every supported family runs its attention through Transformers' ``AttentionInterface``; its attention
modules carry ``layer_idx`` and ``num_key_value_groups`` and receive RoPE-applied queries and keys.
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
)

# model types that only exist as remote code, which does not run on Transformers 5.x
_NEEDS_CONVERSION = {
    "chatglm": "convert the checkpoint to GlmForCausalLM (ChatGLM2/3, original GLM-4)",
    "internlm2": "convert the checkpoint to LlamaForCausalLM (InternLM2/2.5)",
}


# families whose attention needs terms the kernels do not compute yet: what is missing, for the refusal
_NOT_YET = {
    "gemma2": "soft-capped attention logits (attn_logit_softcapping) and sliding-window layers",
    "gemma3_text": "sliding-window layers between its full-attention layers",
    "gemma3": "sliding-window layers between its full-attention layers",
    "gpt_oss": "learned attention sinks (an extra logit per head) and sliding-window layers",
    "exaone4": "sliding-window layers between its full-attention layers",
}


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
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if window is not None and window >= getattr(config, "max_position_embeddings", float("inf")):
        window = None  # a window no input can exceed never binds (Phi-3-128k's 262144): full attention
    if window is not None and "full_attention" not in layer_types:  # Mistral's window: every layer slides
        raise ValueError(
            f"every layer of this {model_type} model attends through its own sliding window of {window} tokens: "
            "no layer reads the whole context, so there is nothing for sparse_attn_hf to make cheaper (its KV "
            "memory is already bounded by the window); use it as it is. If your inputs are shorter than the "
            "window, it never binds: set model.config.sliding_window = None and patch again."
        )
    if window is not None or "sliding_attention" in layer_types:
        raise ValueError(
            f"this {model_type} model uses native sliding-window attention (sliding_window="
            f"{getattr(config, 'sliding_window', None)}), which sparse_attn_hf does not combine with its own "
            "sparsity yet. If your inputs are shorter than the window, set model.config.sliding_window = None "
            "(it then attends exactly as before) and patch again."
        )
    return family


def attention_modules(model) -> list:
    """The attention modules of ``model``, in layer order."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    return sorted(modules, key=lambda m: m.layer_idx)
