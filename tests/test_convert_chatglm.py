"""ChatGLM2/3/GLM-4 -> GlmForCausalLM conversion, checked against an independent forward of the original
architecture written here from its description (reading the ORIGINAL tensors), and by marker rows."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import GlmForCausalLM

from sparse_attn_hf.convert.chatglm import convert_chatglm

HIDDEN, LAYERS, HEADS, HEAD_DIM, FFN, VOCAB = 64, 2, 4, 16, 48, 100


def chatglm_config(*, groups=2, multi_query=True, qkv_bias=True, rope_ratio=1, **extra) -> dict:
    """A tiny config.json of the original ChatGLM2/3 layout."""
    config = {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "auto_map": {},
        "hidden_size": HIDDEN, "ffn_hidden_size": FFN, "num_layers": LAYERS, "num_attention_heads": HEADS,
        "kv_channels": HEAD_DIM, "multi_query_attention": multi_query, "multi_query_group_num": groups,
        "padded_vocab_size": VOCAB, "seq_length": 256, "layernorm_epsilon": 1e-5, "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "add_bias_linear": False,
        "add_qkv_bias": qkv_bias, "rope_ratio": rope_ratio, "original_rope": True, "torch_dtype": "float32",
        "eos_token_id": 2, "pad_token_id": 0,
    }
    config.update(extra)
    return config


def chatglm_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as in an original checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    heads = config["num_attention_heads"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    qkv_rows = (heads + 2 * groups) * HEAD_DIM

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    tensors = {
        "transformer.embedding.word_embeddings.weight": randn(VOCAB, HIDDEN),
        "transformer.encoder.final_layernorm.weight": 1 + randn(HIDDEN, scale=0.1),
        "transformer.output_layer.weight": randn(VOCAB, HIDDEN, scale=HIDDEN ** -0.5),
        "transformer.rotary_pos_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, HEAD_DIM // 2, 2) / (HEAD_DIM // 2)),
    }
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": 1 + randn(HIDDEN, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + randn(HIDDEN, scale=0.1),
            p + "self_attention.query_key_value.weight": randn(qkv_rows, HIDDEN, scale=0.5 * HIDDEN ** -0.5),
            p + "self_attention.dense.weight": randn(HIDDEN, heads * HEAD_DIM, scale=(heads * HEAD_DIM) ** -0.5),
            p + "mlp.dense_h_to_4h.weight": randn(2 * FFN, HIDDEN, scale=HIDDEN ** -0.5),
            p + "mlp.dense_4h_to_h.weight": randn(HIDDEN, FFN, scale=FFN ** -0.5),
        })
        if config["add_qkv_bias"]:
            tensors[p + "self_attention.query_key_value.bias"] = randn(qkv_rows, scale=0.1)
    return tensors


def write_original(folder, config, tensors, *, shards=1, modeling: str | None = None):
    """Write an original-layout checkpoint folder (optionally sharded, optionally with a modeling file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for k, group in enumerate(groups):
        file = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(folder / file))
        weight_map.update({n: file for n in group})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if modeling is not None:
        (folder / "modeling_chatglm.py").write_text(modeling)
    return folder


# ----- independent reference forward of the original architecture ----------------------------------

def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotary(x, positions, base):
    """Rotate pairs (x[2j], x[2j+1]) of the first half of the head dims; x: [seq, heads, head_dim]."""
    rot = x.shape[-1] // 2
    out = x.clone()
    for j in range(rot // 2):
        angle = positions * base ** (-2 * j / rot)  # [seq]
        cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        even, odd = x[..., 2 * j], x[..., 2 * j + 1]
        out[..., 2 * j] = even * cos - odd * sin
        out[..., 2 * j + 1] = odd * cos + even * sin
    return out


def reference_logits(config: dict, tensors: dict, ids: torch.Tensor, mode: str = "base") -> torch.Tensor:
    """Logits [seq, vocab] of one sequence under the original ChatGLM2/3 architecture."""
    heads, eps, ratio = config["num_attention_heads"], config["layernorm_epsilon"], config["rope_ratio"]
    multi_query = config["multi_query_attention"]
    groups = config["multi_query_group_num"] if multi_query else heads
    seq = ids.shape[0]
    positions = torch.arange(seq, dtype=torch.float64)
    base = 10000.0
    if mode == "base":
        base *= ratio
    else:
        positions = positions / ratio
    t = {k: v.double() for k, v in tensors.items()}
    x = t["transformer.embedding.word_embeddings.weight"][ids]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = _rms_norm(x, t[p + "input_layernorm.weight"], eps)
        qkv = h @ t[p + "self_attention.query_key_value.weight"].T
        if config["add_qkv_bias"]:
            qkv = qkv + t[p + "self_attention.query_key_value.bias"]
        if multi_query:  # [q | k | v]
            q = qkv[:, : heads * HEAD_DIM].reshape(seq, heads, HEAD_DIM)
            k = qkv[:, heads * HEAD_DIM: (heads + groups) * HEAD_DIM].reshape(seq, groups, HEAD_DIM)
            v = qkv[:, (heads + groups) * HEAD_DIM:].reshape(seq, groups, HEAD_DIM)
        else:  # per head [q_h | k_h | v_h]
            per_head = qkv.reshape(seq, heads, 3 * HEAD_DIM)
            q, k, v = per_head[..., :HEAD_DIM], per_head[..., HEAD_DIM: 2 * HEAD_DIM], per_head[..., 2 * HEAD_DIM:]
        q, k = _rotary(q, positions, base), _rotary(k, positions, base)
        context = []
        for head in range(heads):
            group = head // (heads // groups)
            scores = q[:, head] @ k[:, group].T / math.sqrt(HEAD_DIM)
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            context.append(weights @ v[:, group])
        x = x + torch.cat(context, dim=-1) @ t[p + "self_attention.dense.weight"].T
        h = _rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        gate, up = (h @ t[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ t[p + "mlp.dense_4h_to_h.weight"].T
    x = _rms_norm(x, t["transformer.encoder.final_layernorm.weight"], eps)
    return x @ t["transformer.output_layer.weight"].T


def _ids(length=24, seed=1):
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def _converted_logits(dst, ids):
    model = GlmForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids[None]).logits[0]


# ----- equivalence ------------------------------------------------------------------------------------

# the two ways the checkpoints' modeling_chatglm.py uses rope_ratio (ChatGLM3/GLM-4; ChatGLM2-6B-32K)
BASE_MODELING = ("    def forward_impl(self, seq_len, n_elem, dtype, device, base: int = 10000):\n"
                 "        base = base * self.rope_ratio\n"
                 "        seq_idx = torch.arange(seq_len, dtype=torch.float, device=device)\n")
POSITIONS_MODELING = ("        # positions are interpolated\n"
                      "        seq_idx = torch.arange(seq_len, dtype=dtype, device=device) / self.rope_ratio\n")

CASES = {  # id: (config kwargs, mode passed, modeling file text, mode the original code uses, shards)
    "gqa-ratio1-sharded": (dict(), None, None, "base", 2),
    "mha-no-mqa-no-bias": (dict(groups=1, multi_query=False, qkv_bias=False), None, None, "base", 1),
    "ratio2-base-flag": (dict(rope_ratio=2), "base", None, "base", 1),
    "ratio4-positions-flag": (dict(rope_ratio=4), "positions", None, "positions", 1),
    "ratio2-base-detected": (dict(rope_ratio=2), None, BASE_MODELING, "base", 1),
    "ratio4-positions-detected": (dict(rope_ratio=4), None, POSITIONS_MODELING, "positions", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_matches_original_architecture(tmp_path, case):
    kwargs, mode, modeling, original_mode, shards = CASES[case]
    config = chatglm_config(**kwargs)
    tensors = chatglm_tensors(config)
    src = write_original(tmp_path / "src", config, tensors, shards=shards, modeling=modeling)
    summary = convert_chatglm(src, tmp_path / "dst", rope_ratio_mode=mode)
    ids = _ids()
    expected = reference_logits(config, tensors, ids, mode=original_mode)
    torch.testing.assert_close(_converted_logits(tmp_path / "dst", ids).double(), expected, rtol=1e-4, atol=1e-4)
    assert "transformer.rotary_pos_emb.inv_freq" in summary
    if config["rope_ratio"] != 1:  # the two readings of rope_ratio really differ on this input
        other = reference_logits(config, tensors, ids, mode="positions" if original_mode == "base" else "base")
        assert (other - expected).abs().max() > 1e-2


def test_converted_config_fields(tmp_path):
    config = chatglm_config(rope_ratio=4, torch_dtype="bfloat16")
    src = write_original(tmp_path / "src", config, chatglm_tensors(config))
    convert_chatglm(src, tmp_path / "dst", rope_ratio_mode="positions")
    out = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert out["model_type"] == "glm" and out["architectures"] == ["GlmForCausalLM"]
    assert (out["vocab_size"], out["hidden_size"], out["intermediate_size"], out["num_hidden_layers"],
            out["num_attention_heads"], out["num_key_value_heads"], out["head_dim"]) == (
        VOCAB, HIDDEN, FFN, LAYERS, HEADS, 2, HEAD_DIM)
    assert out["rms_norm_eps"] == 1e-5 and out["max_position_embeddings"] == 256 and out["attention_bias"] is True
    assert out["tie_word_embeddings"] is False and out["dtype"] == "bfloat16"
    assert (out["eos_token_id"], out["pad_token_id"]) == (2, 0)
    assert out["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.5}


# ----- marker rows: each converted tensor holds exactly the expected original rows ------------------

@pytest.mark.parametrize("multi_query", [True, False])
def test_marker_rows_land_in_the_right_tensors(tmp_path, multi_query):
    groups = 2 if multi_query else HEADS
    config = chatglm_config(groups=groups, multi_query=multi_query)
    tensors = chatglm_tensors(config)
    p = "transformer.encoder.layers.1."
    qkv_rows = (HEADS + 2 * groups) * HEAD_DIM
    rows = torch.arange(qkv_rows, dtype=torch.float32)
    tensors[p + "self_attention.query_key_value.weight"] = rows[:, None].expand(qkv_rows, HIDDEN).clone()
    tensors[p + "self_attention.query_key_value.bias"] = -rows
    hidden_rows = torch.arange(HIDDEN, dtype=torch.float32)[:, None]
    tensors[p + "self_attention.dense.weight"] = hidden_rows.repeat(1, HEADS * HEAD_DIM)
    tensors[p + "mlp.dense_h_to_4h.weight"] = torch.arange(2 * FFN, dtype=torch.float32)[:, None].repeat(1, HIDDEN)
    tensors[p + "mlp.dense_4h_to_h.weight"] = hidden_rows.repeat(1, FFN) + 1000
    src = write_original(tmp_path / "src", config, tensors)
    convert_chatglm(src, tmp_path / "dst")
    model = GlmForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32)
    layer = model.model.layers[1]

    if multi_query:  # [q (H*hd) | k (G*hd) | v (G*hd)]
        q_rows = list(range(HEADS * HEAD_DIM))
        k_rows = list(range(HEADS * HEAD_DIM, (HEADS + groups) * HEAD_DIM))
        v_rows = list(range((HEADS + groups) * HEAD_DIM, qkv_rows))
    else:  # head h holds rows [3h*hd, (3h+1)*hd) for q, then k, then v
        def part(i):
            return [3 * h * HEAD_DIM + i * HEAD_DIM + d for h in range(HEADS) for d in range(HEAD_DIM)]
        q_rows, k_rows, v_rows = part(0), part(1), part(2)
    attn = layer.self_attn
    for proj, expected in ((attn.q_proj, q_rows), (attn.k_proj, k_rows), (attn.v_proj, v_rows)):
        expected = torch.tensor(expected, dtype=torch.float32)
        assert torch.equal(proj.weight, expected[:, None].expand(-1, HIDDEN))
        assert torch.equal(proj.bias, -expected)
    assert torch.equal(attn.o_proj.weight[:, 0], torch.arange(HIDDEN, dtype=torch.float32))
    gate_up = layer.mlp.gate_up_proj.weight[:, 0]
    # GLM computes silu(first half) * second half: the gate (first half of dense_h_to_4h) must stay first
    assert torch.equal(gate_up[:FFN], torch.arange(FFN, dtype=torch.float32))
    assert torch.equal(gate_up[FFN:], torch.arange(FFN, 2 * FFN, dtype=torch.float32))
    assert torch.equal(layer.mlp.down_proj.weight[:, 0], torch.arange(HIDDEN, dtype=torch.float32) + 1000)


# ----- errors -----------------------------------------------------------------------------------------

def _convert_error(tmp_path, config, tensors, **kwargs) -> str:
    src = write_original(tmp_path / "src", config, tensors)
    with pytest.raises(ValueError) as info:
        convert_chatglm(src, tmp_path / "dst", **kwargs)
    return str(info.value)


def test_rejects_chatglm_v1(tmp_path):
    config = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "hidden_size": 64, "num_layers": 2,
              "num_attention_heads": 4, "vocab_size": 100, "inner_hidden_size": 48, "position_encoding_2d": True,
              "max_sequence_length": 256}
    message = _convert_error(tmp_path, config, {"transformer.word_embeddings.weight": torch.zeros(100, 64)})
    assert "v1" in message and "supported" in message


@pytest.mark.parametrize("flag, value", [("rmsnorm", False), ("apply_residual_connection_post_layernorm", True),
                                         ("post_layer_norm", False), ("add_bias_linear", True)])
def test_rejects_unsupported_variants(tmp_path, flag, value):
    config = chatglm_config(**{flag: value})
    message = _convert_error(tmp_path, config, chatglm_tensors(chatglm_config()))
    assert flag in message and "supported" in message


def test_rejects_missing_tensor(tmp_path):
    config = chatglm_config()
    tensors = chatglm_tensors(config)
    del tensors["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    assert "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight" in _convert_error(tmp_path, config, tensors)


def test_rejects_unexpected_tensor(tmp_path):
    config = chatglm_config()
    tensors = chatglm_tensors(config)
    tensors["transformer.prefix_encoder.embedding.weight"] = torch.zeros(4, 8)
    assert "transformer.prefix_encoder.embedding.weight" in _convert_error(tmp_path, config, tensors)


def test_rejects_wrong_shape(tmp_path):
    config = chatglm_config()
    tensors = chatglm_tensors(chatglm_config(groups=1))  # k/v rows of one group, config says two
    assert "query_key_value" in _convert_error(tmp_path, config, tensors)


def test_rope_ratio_needs_a_mode(tmp_path):
    config = chatglm_config(rope_ratio=2)
    message = _convert_error(tmp_path, config, chatglm_tensors(config))
    assert "--rope-ratio base" in message and "positions" in message
    # a modeling file that shows neither use does not help either
    src = write_original(tmp_path / "src2", config, chatglm_tensors(config), modeling="x = 1\n")
    with pytest.raises(ValueError, match="--rope-ratio"):
        convert_chatglm(src, tmp_path / "dst2")


def test_rejects_folder_with_only_bin_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(chatglm_config()))
    (src / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        convert_chatglm(src, tmp_path / "dst")


# ----- command line, tokenizer files ------------------------------------------------------------------

def test_command_line_prints_summary(tmp_path, capsys):
    from sparse_attn_hf.convert.__main__ import main

    config = chatglm_config(rope_ratio=2)
    src = write_original(tmp_path / "src", config, chatglm_tensors(config))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    (src / "tokenization_chatglm.py").write_text(  # the pre-5.x signature of _pad, without padding_side
        "class ChatGLMTokenizer:\n    def _pad(\n        self,\n        encoded_inputs,\n        max_length=None,\n"
        "        return_attention_mask: Optional[bool] = None,\n    ) -> dict:\n        return encoded_inputs\n")
    (src / "tokenizer.model").write_bytes(b"sp")
    main(["chatglm", str(src), str(tmp_path / "dst"), "--rope-ratio", "base"])
    printed = capsys.readouterr().out
    assert "GlmForCausalLM" in printed and "rope_theta 20000" in printed and "trust_remote_code" in printed
    assert "padding_side=None" in printed
    for name in ("tokenizer_config.json", "tokenization_chatglm.py", "tokenizer.model"):
        assert (tmp_path / "dst" / name).is_file() and name in printed


# ----- the converted model can be patched -------------------------------------------------------------

def test_converted_model_can_be_patched(tmp_path):
    from sparse_attn_hf import Profile, patch_model

    config = chatglm_config()
    src = write_original(tmp_path / "src", config, chatglm_tensors(config))
    convert_chatglm(src, tmp_path / "dst")
    model = GlmForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32).eval()
    ids = torch.stack([_ids(20, seed=3), _ids(20, seed=4)])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **settings)
    patch_model(model, Profile.all_dense(model))  # the GLM family is supported: any refusal fails the test
    assert torch.equal(model.generate(ids, **settings), expected)
