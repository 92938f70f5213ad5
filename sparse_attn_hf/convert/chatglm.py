"""ChatGLM2 / ChatGLM3 / original GLM-4(-9B) checkpoints -> ``GlmForCausalLM`` (Transformers 5.x).

The original checkpoints (``model_type: "chatglm"``) only run through their own remote modeling code,
which no longer works on Transformers 5.x. Their architecture is exactly Transformers' ``glm`` model:
pre-norm RMSNorm blocks, grouped-query attention with a fused query/key/value projection, rotary
embeddings on the first half of each head's dims with interleaved pairs ``(x[2j], x[2j+1])``, and a
SwiGLU MLP whose fused up-projection holds the gate rows first. The conversion only splits the fused
query/key/value projection and renames tensors; no value changes.

Rotary ``rope_ratio``: ChatGLM3 and GLM-4 multiply the rotary base by it (``rope_theta = 10000 *
rope_ratio``, mode ``"base"``); ChatGLM2-6B-32K divides positions by it (linear position
interpolation, mode ``"positions"``). The config cannot tell them apart: the mode is read from the
checkpoint's ``modeling_chatglm.py`` when it is there, else it must be given when ``rope_ratio != 1``.

Tokenizer: ChatGLM tokenizers are remote code too (sentencepiece ``ChatGLMTokenizer`` for
ChatGLM2/3, tiktoken for GLM-4) and no Transformers class reads their files. The tokenizer files and
the tokenizer's own Python module (named in ``tokenizer_config.json``'s ``auto_map``) are copied; load
the tokenizer with ``AutoTokenizer.from_pretrained(DST, trust_remote_code=True)`` (``sentencepiece``
or ``tiktoken`` installed), or the same way from the original folder. Transformers 5.x passes
``padding_side`` to the tokenizer's ``_pad``; older revisions of that module do not accept it, so
padded batches raise ``TypeError`` until ``padding_side=None`` is added to ``_pad``'s parameters (the
summary says when the copied module needs it). For GLM-4, the tokenizer of the Hugging Face format
release (``THUDM/glm-4-9b-chat-hf``) has the same ids and needs no remote code.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .io import copy_tokenizer_files, read_checkpoint, write_checkpoint

ROPE_BASE = 10000.0
LAYER_PREFIX = "transformer.encoder.layers."
GLOBAL_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
LAYER_RENAMES = {  # per layer: original name -> GLM name (the fused qkv is split separately)
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # both put the gate rows first
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
DROPPED_BUFFERS = ("transformer.rotary_pos_emb.inv_freq",)
SUPPORTED = ("supported: ChatGLM2-6B(-32K), ChatGLM3-6B(-32K/-128K) and the original GLM-4-9B(-chat/-1m) "
             "checkpoints (RMSNorm, pre-norm residuals, final norm, no linear biases except the qkv bias).")

# how the checkpoint's modeling code uses rope_ratio
_BASE_PATTERN = re.compile(r"base\s*\*\s*(?:self\.)?rope_ratio|(?:self\.)?rope_ratio\s*\*\s*base")
_POSITIONS_PATTERN = re.compile(r"/\s*(?:self\.)?rope_ratio\b")
_PAD_SIGNATURE = re.compile(r"def _pad\((.*?)\)\s*(?:->[^:]*)?:", re.DOTALL)


def convert_chatglm(src: str | Path, dst: str | Path, *, rope_ratio_mode: str | None = None,
                    shard_bytes: int = 4 << 30) -> str:
    """Convert the original ChatGLM2/ChatGLM3/GLM-4 checkpoint folder ``src`` into a ``GlmForCausalLM``
    checkpoint in ``dst``; returns a multi-line summary of what was done.

    ``rope_ratio_mode``: ``"base"`` (rope_theta = 10000 * rope_ratio: ChatGLM3, GLM-4) or
    ``"positions"`` (positions / rope_ratio: ChatGLM2-6B-32K); ``None`` reads it from
    ``src/modeling_chatglm.py``, and is an error when that file is absent and ``rope_ratio != 1``.
    Unsupported variants, missing tensors and unexpected tensors raise ``ValueError``.

    Tokenizer: see the module docstring (``AutoTokenizer.from_pretrained(dst, trust_remote_code=True)``).
    """
    src, dst = Path(src), Path(dst)
    if rope_ratio_mode not in (None, "base", "positions"):
        raise ValueError(f"rope_ratio_mode must be None, 'base' or 'positions', not {rope_ratio_mode!r}.")
    source, tensors = read_checkpoint(src)
    shape = _check_config(source)
    rope_parameters, rope_note = _rope_parameters(source, src, rope_ratio_mode)
    converted, renamed, dropped = _convert_tensors(tensors, shape)
    config = _glm_config(source, shape, rope_parameters)
    paths = write_checkpoint(dst, config, converted, shard_bytes=shard_bytes)
    copied = copy_tokenizer_files(src, dst) + _copy_tokenizer_code(src, dst)
    return "\n".join([
        f"converted {_variant(source)} checkpoint {src} -> GlmForCausalLM in {dst} "
        f"({len(paths)} safetensors file{'s' if len(paths) > 1 else ''})",
        f"shapes: {shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} query heads, "
        f"{shape['groups']} key/value heads, head_dim {shape['head_dim']}, intermediate {shape['ffn']}, "
        f"vocab {config['vocab_size']}, qkv bias {shape['qkv_bias']}, dtype {config.get('dtype')}",
        "config: " + ", ".join(f"{new}={config[new]!r}" for _, new in _CONFIG_FIELDS if new in config)
        + f", pad/bos/eos={config['pad_token_id']}/{config['bos_token_id']}/{config['eos_token_id']}"
        + ", tie_word_embeddings=False",
        f"rotary: {rope_note}; rope_parameters={rope_parameters}",
        f"tensors: {len(converted)} written; {renamed} renamed, {shape['layers']} fused query_key_value "
        f"{'weights+biases' if shape['qkv_bias'] else 'weights'} split into q/k/v_proj",
        f"dropped buffers: {', '.join(dropped) if dropped else 'none'}",
        "tokenizer: " + _tokenizer_note(source, copied, dst),
    ])


# (original field, GLM field) copied as they are
_CONFIG_FIELDS = (
    ("padded_vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "intermediate_size"), ("num_layers", "num_hidden_layers"),
    ("num_attention_heads", "num_attention_heads"), ("multi_query_group_num", "num_key_value_heads"),
    ("kv_channels", "head_dim"), ("layernorm_epsilon", "rms_norm_eps"),
    ("seq_length", "max_position_embeddings"), ("add_qkv_bias", "attention_bias"),
)


def _check_config(source: dict) -> dict:
    """Reject what is not a supported ChatGLM2/3/GLM-4 config; return the shape numbers."""
    model_type = source.get("model_type")
    if model_type == "glm":
        raise ValueError("this checkpoint already is in the GlmForCausalLM format: load it directly.")
    if model_type != "chatglm":
        raise ValueError(f"model_type is {model_type!r}, not 'chatglm'; {SUPPORTED}")
    if source.get("position_encoding_2d") is not None or "kv_channels" not in source:
        raise ValueError("this is a ChatGLM-6B (v1) checkpoint (2D position encoding, GLM-130B style blocks), "
                         f"which has no Transformers counterpart; {SUPPORTED}")
    if "vision_config" in source:
        raise ValueError(f"GLM-4V (vision) checkpoints are not supported; {SUPPORTED}")
    unsupported = {  # flag: (value that is not supported, default of the original ChatGLMConfig)
        "rmsnorm": (False, True),
        "apply_residual_connection_post_layernorm": (True, False),
        "post_layer_norm": (False, True),
        "add_bias_linear": (True, False),
    }
    for flag, (bad, default) in unsupported.items():
        if bool(source.get(flag, default)) == bad:
            raise ValueError(f"config {flag}={bad} is not supported; {SUPPORTED}")
    if source.get("pre_seq_len"):
        raise ValueError("P-tuning prefix checkpoints (pre_seq_len set) are not supported: merge or drop the "
                         f"prefix encoder and set pre_seq_len to null first; {SUPPORTED}")
    required = ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "kv_channels",
                "padded_vocab_size", "seq_length")
    missing = [key for key in required if key not in source]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}; {SUPPORTED}")
    multi_query = bool(source.get("multi_query_attention", False))
    heads = source["num_attention_heads"]
    groups = source.get("multi_query_group_num", 1) if multi_query else heads
    if heads % groups:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of multi_query_group_num {groups}.")
    return {"hidden": source["hidden_size"], "ffn": source["ffn_hidden_size"], "layers": source["num_layers"],
            "heads": heads, "groups": groups, "head_dim": source["kv_channels"], "multi_query": multi_query,
            "vocab": source["padded_vocab_size"], "qkv_bias": bool(source.get("add_qkv_bias", False))}


def detect_rope_ratio_mode(modeling_source: str) -> str | None:
    """``"base"`` or ``"positions"`` from the text of a ``modeling_chatglm.py``; ``None`` when it does
    not show exactly one of the two uses of ``rope_ratio``."""
    code = "\n".join(line.split("#", 1)[0] for line in modeling_source.splitlines())
    in_base, in_positions = bool(_BASE_PATTERN.search(code)), bool(_POSITIONS_PATTERN.search(code))
    if in_base != in_positions:
        return "base" if in_base else "positions"
    return None


def _rope_parameters(source: dict, src: Path, mode: str | None) -> tuple[dict, str]:
    """GLM ``rope_parameters`` (partial rotary factor 0.5) for the checkpoint's rope_ratio, and a note."""
    ratio = float(source.get("rope_ratio", 1) or 1)
    parameters = {"rope_type": "default", "rope_theta": ROPE_BASE, "partial_rotary_factor": 0.5}
    modeling = src / "modeling_chatglm.py"
    detected = detect_rope_ratio_mode(modeling.read_text(errors="replace")) if modeling.is_file() else None
    if ratio == 1:
        return parameters, "rope_ratio 1: base 10000, plain positions"
    if mode is None:
        if detected is None:
            where = ("its modeling_chatglm.py does not show how rope_ratio is used" if modeling.is_file()
                     else "there is no modeling_chatglm.py in the source folder to read it from")
            raise ValueError(
                f"config rope_ratio is {ratio:g} and {where}: pass --rope-ratio base (ChatGLM3, GLM-4: the "
                "rotary base is 10000 * rope_ratio) or --rope-ratio positions (ChatGLM2-6B-32K: positions are "
                "divided by rope_ratio), i.e. rope_ratio_mode='base'|'positions'.")
        mode, how = detected, "read from modeling_chatglm.py"
    else:
        how = "given"
        if detected is not None and detected != mode:
            how += f" (modeling_chatglm.py suggests {detected!r}; the given mode wins)"
    if mode == "base":
        parameters["rope_theta"] = ROPE_BASE * ratio
        return parameters, (f"rope_ratio {ratio:g} multiplies the base (mode 'base', {how}): "
                            f"rope_theta {ROPE_BASE * ratio:g}")
    parameters.update(rope_type="linear", factor=ratio)
    return parameters, (f"rope_ratio {ratio:g} divides positions (mode 'positions', {how}): "
                        f"linear scaling, factor {ratio:g}")


def split_qkv(fused: torch.Tensor, heads: int, groups: int, head_dim: int, multi_query: bool):
    """(q, k, v) rows of a fused ``query_key_value`` weight [rows, hidden] or bias [rows].

    With multi-query attention the rows are ``[q (heads*hd) | k (groups*hd) | v (groups*hd)]``; without
    it (Megatron layout) they are per head ``[q_h | k_h | v_h]`` for h = 0..heads-1.
    """
    if multi_query:
        return fused.split([heads * head_dim, groups * head_dim, groups * head_dim], dim=0)
    per_head = fused.reshape(heads, 3, head_dim, *fused.shape[1:])
    return tuple(per_head[:, part].reshape(heads * head_dim, *fused.shape[1:]) for part in range(3))


def expected_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the original layout that the config implies, with its shape."""
    hidden, vocab, ffn = shape["hidden"], shape["vocab"], shape["ffn"]
    qkv_rows = (shape["heads"] + 2 * shape["groups"]) * shape["head_dim"]
    shapes = {"transformer.embedding.word_embeddings.weight": (vocab, hidden),
              "transformer.encoder.final_layernorm.weight": (hidden,),
              "transformer.output_layer.weight": (vocab, hidden)}
    for layer in range(shape["layers"]):
        prefix = f"{LAYER_PREFIX}{layer}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attention.query_key_value.weight": (qkv_rows, hidden),
            prefix + "self_attention.dense.weight": (hidden, shape["heads"] * shape["head_dim"]),
            prefix + "mlp.dense_h_to_4h.weight": (2 * ffn, hidden),
            prefix + "mlp.dense_4h_to_h.weight": (hidden, ffn),
        })
        if shape["qkv_bias"]:
            shapes[prefix + "self_attention.query_key_value.bias"] = (qkv_rows,)
    return shapes


def _convert_tensors(tensors: dict[str, torch.Tensor], shape: dict) -> tuple[dict, int, list[str]]:
    """(GLM tensors, how many were renamed, dropped buffer names); ``ValueError`` on a missing,
    unexpected or wrongly shaped tensor."""
    if any(name.startswith("transformer.layers.") for name in tensors):
        raise ValueError(f"tensor names 'transformer.layers.*' are ChatGLM-6B (v1) names; {SUPPORTED}")
    expected = expected_shapes(shape)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) that the config implies: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    dropped = [name for name in DROPPED_BUFFERS if name in tensors]
    unexpected = sorted(set(tensors) - set(expected) - set(dropped))
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in the checkpoint: {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''} (not part of a plain ChatGLM2/3/GLM-4 "
                         f"model with this config); {SUPPORTED}")
    for name, size in expected.items():
        if tuple(tensors[name].shape) != size:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}; the config implies {size}.")

    converted = {new: tensors[old] for old, new in GLOBAL_RENAMES.items()}
    for layer in range(shape["layers"]):
        old_prefix, new_prefix = f"{LAYER_PREFIX}{layer}.", f"model.layers.{layer}."
        for old, new in LAYER_RENAMES.items():
            converted[new_prefix + new] = tensors[old_prefix + old]
        for part in ("weight", "bias") if shape["qkv_bias"] else ("weight",):
            fused = tensors[f"{old_prefix}self_attention.query_key_value.{part}"]
            pieces = split_qkv(fused, shape["heads"], shape["groups"], shape["head_dim"], shape["multi_query"])
            for proj, piece in zip("qkv", pieces):
                converted[f"{new_prefix}self_attn.{proj}_proj.{part}"] = piece.clone()
    renamed = len(GLOBAL_RENAMES) + len(LAYER_RENAMES) * shape["layers"]
    return converted, renamed, dropped


def _glm_config(source: dict, shape: dict, rope_parameters: dict) -> dict:
    """The ``config.json`` of the converted ``GlmForCausalLM``."""
    config = {"architectures": ["GlmForCausalLM"], "model_type": "glm"}
    for old, new in _CONFIG_FIELDS:
        config[new] = source.get(old)
    config["rms_norm_eps"] = source.get("layernorm_epsilon", 1e-5)  # ChatGLMConfig's default
    config.update(num_key_value_heads=shape["groups"], attention_bias=shape["qkv_bias"], hidden_act="silu",
                  attention_dropout=0.0, tie_word_embeddings=False, use_cache=True,
                  rope_parameters=rope_parameters)
    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):
        config[token] = source.get(token)
    if config["eos_token_id"] is None:  # GlmConfig would fill in GLM-4's ids
        config["eos_token_id"] = []
    dtype = source.get("torch_dtype") or source.get("dtype")
    if dtype:
        config["dtype"] = dtype
    return config


def _variant(source: dict) -> str:
    """A readable guess of which release ``source`` is (only used in the summary)."""
    vocab, ratio = source["padded_vocab_size"], source.get("rope_ratio", 1)
    if vocab == 151552:
        return f"original GLM-4 (rope_ratio {ratio})"
    if vocab == 65024:
        return f"ChatGLM2/ChatGLM3 (rope_ratio {ratio})"
    return f"ChatGLM2/3-architecture (vocab {vocab}, rope_ratio {ratio})"


def _copy_tokenizer_code(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer's remote-code modules named in ``tokenizer_config.json``'s ``auto_map``."""
    config_path = src / "tokenizer_config.json"
    if not config_path.is_file():
        return []
    auto_map = json.loads(config_path.read_text()).get("auto_map", {})
    references = auto_map.get("AutoTokenizer", []) if isinstance(auto_map, dict) else []
    if not isinstance(references, list):
        references = [references]
    # "module.Class", or "repo--module.Class" when it points at another repository
    modules = {ref.split("--")[-1].rsplit(".", 1)[0] for ref in references if ref}
    copied = []
    for module in sorted(modules):
        if (src / f"{module}.py").is_file():
            shutil.copy2(src / f"{module}.py", dst / f"{module}.py")
            copied.append(f"{module}.py")
    return copied


def _tokenizer_note(source: dict, copied: list[str], dst: Path) -> str:
    """What a user must do to get a working tokenizer for the converted checkpoint."""
    files = f"copied {', '.join(copied)}" if copied else "no tokenizer files found in the source folder"
    needs = "tiktoken" if source["padded_vocab_size"] == 151552 else "sentencepiece"
    advice = (f"the ChatGLM tokenizer is remote code (no Transformers class): load it with "
              f"AutoTokenizer.from_pretrained(DST or SRC, trust_remote_code=True) ({needs} installed)")
    for name in copied:
        if name.endswith(".py") and _pad_lacks_padding_side((dst / name).read_text(errors="replace")):
            advice += (f"; {name}'s _pad() has no padding_side parameter, so padded batches raise TypeError on "
                       "Transformers 5.x: add `padding_side=None` to its parameters (or use the checkpoint's "
                       "updated upstream revision)")
    if source["padded_vocab_size"] == 151552:
        advice += ("; or use the tokenizer of the HF-format GLM-4 release (THUDM/glm-4-9b-chat-hf): same ids, "
                   "no remote code")
    return f"{files}; {advice}."


def _pad_lacks_padding_side(code: str) -> bool:
    """Whether a tokenizer module overrides ``_pad`` with the pre-5.x signature (no ``padding_side``)."""
    match = _PAD_SIGNATURE.search(code)
    return match is not None and "padding_side" not in match.group(1)
