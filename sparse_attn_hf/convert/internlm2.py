"""InternLM2 / InternLM2.5 checkpoints -> ``LlamaForCausalLM`` (native in Transformers 5.x).

InternLM2 is a Llama architecture with other tensor names and one fused attention projection:
``attention.wqkv`` holds, for each KV head ``g``, the rows of its ``n_rep`` query heads, then of key
``g``, then of value ``g`` (``head_dim`` rows each). The converter splits it into ``q_proj``,
``k_proj`` and ``v_proj``, renames the other tensors, maps the config (``bias`` ->
``attention_bias``; ``rope_theta``/``rope_scaling`` -> Transformers 5's ``rope_parameters``) and
writes safetensors that ``LlamaForCausalLM.from_pretrained(dst)`` loads without remote code.

Rotary scaling: ``{"type": "linear"}`` is exact (InternLM2 divides positions by the factor, Transformers
divides the frequencies). ``{"type": "dynamic"}`` uses the same NTK formula and the same trigger
(longest position + 1 > ``max_position_embeddings``), but the base of a call depends on the calls before it
in Transformers: see ``_rope_parameters`` for exactly when the converted model differs.

Tokenizer: InternLM2Tokenizer is remote code on top of sentencepiece; Transformers 5.x has no native
class for it, and building a Llama tokenizer from ``tokenizer.model`` needs ``sentencepiece`` and
``protobuf`` and has not been checked to give InternLM2's ids. The converter therefore copies the
tokenizer files and the tokenizer's remote code unchanged; load the tokenizer with
``AutoTokenizer.from_pretrained(dst, trust_remote_code=True)`` (after ``pip install sentencepiece``;
read the code first). Token ids are unchanged, so the original tokenizer fits the converted model.

Example:
    >>> summary = convert_internlm2("internlm2_5-7b-chat", "internlm2_5-7b-chat-llama")
    >>> model = LlamaForCausalLM.from_pretrained("internlm2_5-7b-chat-llama")
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .io import copy_tokenizer_files, read_checkpoint, write_checkpoint

# InternLM2 name inside ``model.layers.{i}.`` -> Llama name (biases are added when config ``bias``).
LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
GLOBAL_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# The remote tokenizer code that an InternLM2 tokenizer_config.json's auto_map points at.
REMOTE_TOKENIZER_FILES = ("tokenization_internlm2.py", "tokenization_internlm2_fast.py")
# Config keys that do not describe the network (or that the Llama config gets otherwise).
_IGNORED_CONFIG_KEYS = {
    "architectures", "auto_map", "attn_implementation", "transformers_version", "model_type", "use_cache",
    "initializer_range", "pretraining_tp", "torch_dtype", "dtype", "_name_or_path", "rope_theta", "rope_scaling",
}
_MAPPED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                  "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")
_TOKENIZER_NOTE = (
    "InternLM2Tokenizer is remote code on sentencepiece; Transformers 5.x has no native class for it. Load it "
    "with AutoTokenizer.from_pretrained(DST or SRC, trust_remote_code=True) after `pip install sentencepiece` "
    "(read the code first: it was written for Transformers 4.x). Token ids are unchanged. No Llama tokenizer "
    "was built from tokenizer.model: that needs sentencepiece and protobuf and is not verified to match."
)


def convert_internlm2(src: str | Path, dst: str | Path, *, shard_bytes: int = 4 << 30) -> str:
    """Convert the InternLM2/InternLM2.5 checkpoint folder ``src`` into a Llama checkpoint in ``dst``.

    ``src`` holds config.json (``model_type`` "internlm2") and safetensors weights (sharded or not).
    ``dst`` gets config.json, safetensors (sharded above ``shard_bytes``), the tokenizer files and the
    tokenizer's remote code (see the module docstring for loading the tokenizer). Returns a
    multi-line summary. Raises ``ValueError`` for an unsupported config or tensor set and
    ``FileNotFoundError`` for a folder without config.json or safetensors weights.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError("dst must be a different folder from src (the converter would overwrite the original).")
    original, tensors = read_checkpoint(src)
    shape = _check_config(original)
    rope, rope_note = _rope_parameters(original, shape["head_dim"])
    _check_tensors(tensors, shape)
    converted, dropped = _convert_tensors(tensors, shape)
    config = _llama_config(original, shape, rope)
    paths = write_checkpoint(dst, config, converted, shard_bytes=shard_bytes)
    copied = copy_tokenizer_files(src, dst)
    for name in REMOTE_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return _summary(src, dst, original, shape, config, rope_note, tensors, converted, dropped, paths, copied)


# ----------------------------------------------------------------------------------------- config
def _check_config(config: dict) -> dict:
    """The shape fields of a supported InternLM2 config; ``ValueError`` naming what is unsupported."""
    model_type = config.get("model_type")
    if model_type == "internlm":
        raise ValueError("model_type 'internlm' is InternLM (v1), which this converter does not handle; it "
                         "converts InternLM2/InternLM2.5 (model_type 'internlm2') only.")
    if model_type == "internlm3":
        raise ValueError("model_type 'internlm3' is native in Transformers 5.x: load it without converting.")
    if model_type != "internlm2":
        raise ValueError(f"model_type is {model_type!r}; this converter handles 'internlm2' (InternLM2/2.5) only.")
    architectures = config.get("architectures") or ["InternLM2ForCausalLM"]
    if architectures != ["InternLM2ForCausalLM"]:
        raise ValueError(f"architectures {architectures} is not supported: only InternLM2ForCausalLM converts "
                         "to LlamaForCausalLM (reward and other heads have no Llama counterpart).")
    missing = [key for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if key not in config]
    if missing:
        raise ValueError(f"config.json lacks {missing}.")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if hidden % heads:
        raise ValueError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}.")
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}.")
    head_dim = hidden // heads
    if config.get("head_dim", head_dim) != head_dim:
        raise ValueError(f"config head_dim={config['head_dim']} differs from hidden_size // num_attention_heads="
                         f"{head_dim}, which InternLM2 uses; this variant is not supported.")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported (InternLM2 uses 'silu').")
    bias = config.get("bias", True)  # InternLM2Config's default
    if not isinstance(bias, bool):
        raise ValueError(f"config bias={bias!r} must be true or false.")
    return dict(layers=config["num_hidden_layers"], hidden=hidden, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, intermediate=config["intermediate_size"], vocab=config["vocab_size"], bias=bias,
                tied=bool(config.get("tie_word_embeddings", False)))


def _rope_parameters(config: dict, head_dim: int) -> tuple[dict, str]:
    """Transformers 5 ``rope_parameters`` for InternLM2's ``rope_theta``/``rope_scaling``, and a note.

    InternLM2 applies rotate-half RoPE to the whole head, like Llama. Its scalings, for a factor ``f``,
    base ``b``, ``dim = head_dim`` and ``M = max_position_embeddings``:

    * linear: positions ``t / f``; Transformers' "linear" uses ``inv_freq / f``: the same angles.
    * dynamic: when the longest position + 1 (``L``) exceeds ``M``, the base becomes
      ``b * (f * L / M - (f - 1)) ** (dim / (dim - 2))``. InternLM2's code computes it from each call's own
      ``L``. Transformers' "dynamic" computes the same formula but keeps the largest base it has computed:
      the base grows with ``L`` and never shrinks while calls stay longer than ``M``, and the first call with
      ``L < M`` returns it to ``b``. So the converted model gives InternLM2's logits for a first call, for a
      call longer than every call before it and for calls within ``M``; a call longer than ``M`` but shorter
      than an earlier one uses the earlier, larger base (tests/test_convert_internlm2.py, a tiny checkpoint with
      ``M`` = 8 and factor 2.5: a 13-token call after a 16-token call differs by up to 0.32 in logits of
      magnitude 5). To get InternLM2's base for such a call, reload the model or make a call within ``M``
      first.
    """
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}, f"default RoPE, theta {theta:g}, full head_dim {head_dim}"
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={scaling!r} is not a dict or null.")
    kind = scaling.get("type", scaling.get("rope_type"))
    unknown = set(scaling) - {"type", "rope_type", "factor"}
    if kind not in ("linear", "dynamic") or unknown:
        raise ValueError(f"rope_scaling={scaling} is not supported: InternLM2 defines "
                         "{'type': 'linear' | 'dynamic', 'factor': f} only.")
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"rope_scaling factor={factor!r} must be a number >= 1.")
    rope = {"rope_type": kind, "factor": float(factor), "rope_theta": theta}
    if kind == "linear":
        note = (f"linear scaling, factor {factor:g}, theta {theta:g}: exact (InternLM2 divides positions by the "
                "factor, Transformers the frequencies)")
    else:
        note = (f"dynamic NTK scaling, factor {factor:g}, theta {theta:g}: same formula and trigger as InternLM2 "
                f"(the base grows once the longest position + 1 exceeds max_position_embeddings="
                f"{config.get('max_position_embeddings')}); difference: Transformers keeps the largest base of "
                "the calls so far until a call within max_position_embeddings, InternLM2 computes it per call, so "
                "a long call after a longer one differs")
    return rope, note


def _llama_config(original: dict, shape: dict, rope: dict) -> dict:
    """The Llama config.json as a dict, built and validated by ``LlamaConfig``."""
    from transformers import LlamaConfig

    fields = {key: original[key] for key in _MAPPED_FIELDS if key in original}
    fields["num_key_value_heads"] = shape["kv_heads"]
    dtype = original.get("dtype", original.get("torch_dtype"))
    config = LlamaConfig(**fields, head_dim=shape["head_dim"], hidden_act="silu", attention_bias=shape["bias"],
                         mlp_bias=False, rope_parameters=dict(rope), dtype=dtype)
    config.architectures = ["LlamaForCausalLM"]
    return config.to_dict()


# ---------------------------------------------------------------------------------------- tensors
def _expected_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the original checkpoint with its shape (``output.weight`` included)."""
    hidden, hd, inter = shape["hidden"], shape["head_dim"], shape["intermediate"]
    qkv_rows = (shape["heads"] + 2 * shape["kv_heads"]) * hd
    expected = {"model.tok_embeddings.weight": (shape["vocab"], hidden), "model.norm.weight": (hidden,),
                "output.weight": (shape["vocab"], hidden)}
    for i in range(shape["layers"]):
        layer = {
            "attention.wqkv.weight": (qkv_rows, hidden),
            "attention.wo.weight": (hidden, shape["heads"] * hd),
            "attention_norm.weight": (hidden,),
            "ffn_norm.weight": (hidden,),
            "feed_forward.w1.weight": (inter, hidden),
            "feed_forward.w3.weight": (inter, hidden),
            "feed_forward.w2.weight": (hidden, inter),
        }
        if shape["bias"]:
            layer.update({"attention.wqkv.bias": (qkv_rows,), "attention.wo.bias": (hidden,)})
        expected.update({f"model.layers.{i}.{name}": size for name, size in layer.items()})
    return expected


def _is_rotary_buffer(name: str) -> bool:
    """Old exports may hold the recomputable ``inv_freq`` buffers; they are dropped."""
    return name.startswith("model.layers.") and name.endswith(".attention.rotary_emb.inv_freq")


def _check_tensors(tensors: dict[str, torch.Tensor], shape: dict) -> None:
    """``ValueError`` naming missing, unexpected or wrongly shaped tensors."""
    expected = _expected_shapes(shape)
    optional = {"output.weight"} if shape["tied"] else set()
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(name for name in set(tensors) - set(expected) if not _is_rotary_buffer(name))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) of an InternLM2 model with this config, "
                         f"e.g. {missing[:5]}.")
    if unexpected:
        raise ValueError(f"checkpoint holds {len(unexpected)} tensor(s) that InternLM2ForCausalLM does not have "
                         f"(another variant?): {unexpected[:5]}.")
    wrong = [f"{name} {list(tensors[name].shape)} (expected {list(size)})" for name, size in expected.items()
             if name in tensors and tuple(tensors[name].shape) != size]
    if wrong:
        raise ValueError(f"tensor shapes do not match config.json: {wrong[:5]}.")
    if shape["tied"] and "output.weight" in tensors and not torch.equal(tensors["output.weight"],
                                                                     tensors["model.tok_embeddings.weight"]):
        raise ValueError("tie_word_embeddings is true but output.weight differs from model.tok_embeddings.weight.")


def split_wqkv(wqkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Split InternLM2's fused ``wqkv`` weight [rows, hidden] or bias [rows] into (q, k, v).

    Rows are grouped per KV head ``g``: its ``heads // kv_heads`` query heads, key ``g``, value ``g``.
    q comes out as heads 0..heads-1 in order (query head ``g * n_rep + r`` is the ``r``-th of group
    ``g``, the head that Llama's ``repeat_kv`` pairs with KV head ``g``).
    """
    n_rep = heads // kv_heads
    groups = wqkv.reshape(kv_heads, n_rep + 2, head_dim, *wqkv.shape[1:])
    rest = wqkv.shape[1:]
    q = groups[:, :n_rep].reshape(heads * head_dim, *rest)
    k = groups[:, n_rep].reshape(kv_heads * head_dim, *rest)
    v = groups[:, n_rep + 1].reshape(kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _convert_tensors(tensors: dict[str, torch.Tensor], shape: dict) -> tuple[dict[str, torch.Tensor], int]:
    """(Llama-named tensors, number of dropped rotary buffers); ``tensors`` was checked already."""
    out = {new: tensors[old] for old, new in GLOBAL_RENAMES.items() if old in tensors}
    if shape["tied"]:
        out.pop("lm_head.weight", None)  # Llama ties it to embed_tokens
    suffixes = ["weight", "bias"] if shape["bias"] else ["weight"]
    for i in range(shape["layers"]):
        prefix = f"model.layers.{i}."  # the same in both layouts
        for before, after in LAYER_RENAMES.items():
            out[prefix + after] = tensors[prefix + before]
        if shape["bias"]:
            out[prefix + "self_attn.o_proj.bias"] = tensors[prefix + "attention.wo.bias"]
        for suffix in suffixes:
            q, k, v = split_wqkv(tensors[f"{prefix}attention.wqkv.{suffix}"], shape["heads"], shape["kv_heads"],
                                 shape["head_dim"])
            out[f"{prefix}self_attn.q_proj.{suffix}"] = q
            out[f"{prefix}self_attn.k_proj.{suffix}"] = k
            out[f"{prefix}self_attn.v_proj.{suffix}"] = v
    dropped = sum(1 for name in tensors if _is_rotary_buffer(name))
    return out, dropped


# ---------------------------------------------------------------------------------------- summary
def _summary(src, dst, original, shape, config, rope_note, tensors, converted, dropped, paths, copied) -> str:
    """The multi-line report that ``convert_internlm2`` returns."""
    hd, n_rep = shape["head_dim"], shape["heads"] // shape["kv_heads"]
    mapped = ", ".join(f"{key}={config[key]}" for key in _MAPPED_FIELDS if key in config)
    ignored = sorted(set(original) - _IGNORED_CONFIG_KEYS - set(_MAPPED_FIELDS)
                     - {"bias", "hidden_act", "head_dim", "num_key_value_heads"})
    renames = ", ".join(f"{old}->{new}" for old, new in {**GLOBAL_RENAMES, **LAYER_RENAMES}.items() if old != new)
    lines = [
        f"InternLM2 -> LlamaForCausalLM: {src} -> {dst}",
        f"  shape: {shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} query heads / "
        f"{shape['kv_heads']} KV heads ({n_rep} per KV head), head_dim {hd}, intermediate {shape['intermediate']}, "
        f"vocab {shape['vocab']}, dtype {config.get('dtype')}",
        f"  config: {mapped}, head_dim={hd}, "
        f"bias={shape['bias']} -> attention_bias={shape['bias']}, mlp_bias=False",
        f"  rope: {rope_note}; rope_parameters={config['rope_parameters']}",
        f"  split: attention.wqkv [{(shape['heads'] + 2 * shape['kv_heads']) * hd}, {shape['hidden']}] per KV head "
        f"[{n_rep} q, k, v] x {hd} rows -> q_proj [{shape['heads'] * hd}], k_proj [{shape['kv_heads'] * hd}], "
        f"v_proj [{shape['kv_heads'] * hd}]" + (" (weights and biases)" if shape["bias"] else ""),
        f"  renames: {renames}",
        f"  tensors: {len(tensors)} read -> {len(converted)} written in {len(paths)} file(s)"
        + (f"; dropped {dropped} rotary inv_freq buffer(s) (recomputed from rope_theta)" if dropped else "")
        + ("; lm_head tied to embed_tokens" if shape["tied"] else ""),
    ]
    if ignored:
        lines.append(f"  not carried over (no Llama counterpart): {', '.join(ignored)}")
    lines.append(f"  tokenizer: copied {', '.join(copied) or 'nothing (no tokenizer files in src)'}. {_TOKENIZER_NOTE}")
    lines.append(f"  load: LlamaForCausalLM.from_pretrained({str(dst)!r})")
    return "\n".join(lines)
