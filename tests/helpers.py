"""Shared test helpers: tiny models built from configs, an independent mask, one tolerance rule."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 96
# tiny configs with window layers of 8 tokens; Gemma 2 soft-caps its logits (to matter on tiny random
# weights needs 0.02: their scaled logits are far below 1), GPT-OSS adds learned sinks (random, so that they matter)
WINDOW_FAMILIES = ("ministral", "gemma3", "exaone4", "qwen2_window", "gemma2", "gpt_oss")


def tiny_model(family: str = "llama", *, heads: int = 4, kv_heads: int = 2, layers: int = 2, head_dim: int = 16,
               dtype=torch.float32, seed: int = 0, vocab: int = VOCAB):
    """A random tiny ``*ForCausalLM`` of ``family`` (no download)."""
    common = dict(
        vocab_size=vocab, hidden_size=16 * heads, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "mistral":
        config = MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    elif family in ("glm", "glm4"):
        from transformers import Glm4Config, GlmConfig

        config = (GlmConfig if family == "glm" else Glm4Config)(**common)
    elif family == "qwen3":
        from transformers import Qwen3Config

        config = Qwen3Config(**common)
    elif family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        config = Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                decoder_sparse_step=1, mlp_only_layers=[0])  # layer 0 dense MLP, the rest MoE
    elif family in ("phi3", "phi3_longrope"):
        from transformers import Phi3Config

        extra = {}
        if family == "phi3_longrope":  # LongRoPE: per-frequency factors, the long ones past the original length
            half = common["head_dim"] // 2
            extra = dict(original_max_position_embeddings=16, rope_scaling={
                "type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
                "long_factor": [1.5 + 0.1 * i for i in range(half)]})
        config = Phi3Config(**{k: v for k, v in common.items() if k != "head_dim"}, **extra)
    elif family in WINDOW_FAMILIES:  # hybrid: window layers (window 8) between full-attention ones
        types = [("full_attention" if i % 2 else "sliding_attention") for i in range(layers)]
        if family == "ministral":
            from transformers import MinistralConfig

            config = MinistralConfig(**common, sliding_window=8, layer_types=types)
        elif family == "gemma3":
            from transformers import Gemma3TextConfig

            config = Gemma3TextConfig(**common, sliding_window=8, layer_types=types, query_pre_attn_scalar=24)
        elif family == "exaone4":
            from transformers import Exaone4Config

            config = Exaone4Config(**common, sliding_window=8, layer_types=types)
        elif family == "gemma2":
            from transformers import Gemma2Config

            config = Gemma2Config(**common, sliding_window=8, layer_types=types, query_pre_attn_scalar=24,
                                  attn_logit_softcapping=0.02, final_logit_softcapping=None)
        elif family == "gpt_oss":
            from transformers import GptOssConfig

            config = GptOssConfig(**common, sliding_window=8, layer_types=types, num_local_experts=4,
                                  num_experts_per_tok=2)
        else:  # qwen2 with use_sliding_window: layers from max_window_layers on slide
            config = Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    elif family == "internlm3":
        try:
            from transformers import InternLM3Config  # not in every 5.x release
        except ImportError:
            import pytest

            pytest.skip("this transformers release has no InternLM3")
        config = InternLM3Config(**common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    # Gemma 2's reference is eager attention: SDPA ignores its soft-capping (the default before Transformers 5.24)
    extra = {"attn_implementation": "eager"} if family == "gemma2" else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra).eval()
    if family == "gpt_oss":  # sinks start at zero: make them matter
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "sinks"):
                    module.sinks.copy_(torch.randn(module.sinks.shape, generator=torch.Generator().manual_seed(seed)))
    model.generation_config.pad_token_id = 0
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``b`` keeps its first ``length - pads[b]`` tokens behind ``pads[b]`` pads (id 0).

    Returns (input_ids, attention_mask), both [batch, length]."""
    batch, length = ids.shape
    out = torch.zeros_like(ids)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, pad in enumerate(pads):
        out[b, pad:] = ids[b, : length - pad]
        mask[b, pad:] = 1
    return out, mask


def loop_mask(q_pos, k_pos, kv_start, streaming, sink, local) -> torch.Tensor:
    """The visibility rule written as plain loops, independent of the package's vectorized one."""
    batch, q_len = q_pos.shape
    k_len = k_pos.shape[1]
    mask = torch.zeros(batch, len(streaming), q_len, k_len, dtype=torch.bool)
    for b in range(batch):
        start = int(kv_start[b])
        for h, is_streaming in enumerate(streaming.tolist()):
            for i in range(q_len):
                qi = int(q_pos[b, i])
                for j in range(k_len):
                    kj = int(k_pos[b, j])
                    if kj < start or kj > qi:
                        continue
                    if is_streaming and not (kj - start < sink or qi - kj < local):
                        continue
                    mask[b, h, i, j] = True
    return mask


def independent_logits(model, ids, mask=None) -> torch.Tensor:
    """Logits of a patched ``model`` with its attention computed by PyTorch under masks built by plain loops
    (``loop_mask``) from the model's labels and each layer's rule (a native window layer: sink 0, local = its
    window): independent of the package's kernels and vectorized rule. Cache-less, one forward; no learned sinks
    or soft-capping (families with those terms need their own reference)."""
    from transformers import AttentionInterface

    state = model._sparse_attn_state
    labels = state.streaming

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        batch, k_len = key.shape[0], key.shape[2]
        starts = torch.zeros(batch, dtype=torch.long) if mask is None else (mask == 0).sum(-1)
        slots = torch.arange(k_len).expand(batch, -1)
        sink, local, _ = state.rule(module.layer_idx)
        visible = loop_mask(slots[:, k_len - query.shape[2]:], slots, starts, labels[module.layer_idx], sink, local)
        return masked_sdpa(query, key, value, visible, scaling), None

    AttentionInterface.register("test_loops", attend)
    model.set_attn_implementation("test_loops")
    try:
        return model(ids, attention_mask=mask, use_cache=False).logits
    finally:
        model.set_attn_implementation("sparse_attn_hf")
        assert model._sparse_attn_state is state


def masked_sdpa(query, key, value, mask, scale) -> torch.Tensor:
    """PyTorch's own attention with an explicit per-KV-head mask; output [B, Lq, Hq, D].

    Rows without a visible key give zeros, like the package's contract.
    """
    groups = query.shape[1] // key.shape[1]
    full_mask = mask.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1),
        attn_mask=full_mask, scale=scale,
    )
    out = torch.where(full_mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype))
    return out.transpose(1, 2)


def assert_close_by_rule(result: torch.Tensor, golden: torch.Tensor, baseline: torch.Tensor, factor: float = 3.0,
                         slack: float = 0.0):
    """The one tolerance rule: ``result``'s max error against a float64 ``golden`` is at most ``factor``
    times PyTorch's own error (``baseline``, same dtype) plus a float32 floor (plus ``slack``, for kernels
    that round the probabilities to the input dtype before P.V where the baseline does not)."""
    assert not torch.isnan(result).any(), "NaN in result"
    golden = golden.double()
    err = (result.double() - golden).abs().max().item()
    base = (baseline.double() - golden).abs().max().item()
    floor = 1e-5 * max(1.0, golden.abs().max().item()) + slack
    if os.environ.get("SPARSE_ATTN_HF_ERROR_LOG"):  # benchmarks/gpu_tests.py collects these
        with open(os.environ["SPARSE_ATTN_HF_ERROR_LOG"], "a") as log:
            case = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            log.write(json.dumps({"case": case, "max_error": err, "pytorch_error": base, "bound": factor * base + floor}) + "\n")
    assert err <= factor * base + floor, f"error {err:.3e} > {factor} x PyTorch's {base:.3e} + {floor:.1e}"
