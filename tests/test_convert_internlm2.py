"""convert_internlm2: tiny original-layout InternLM2 checkpoints -> LlamaForCausalLM, checked against an
independent plain-torch forward of the original architecture and against marked wqkv rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from sparse_attn_hf import Profile, SparseConfig, patch_model, unpatch_model
from sparse_attn_hf.convert.__main__ import main
from sparse_attn_hf.convert.internlm2 import convert_internlm2

HIDDEN, LAYERS, VOCAB, INTERMEDIATE = 64, 2, 100, 48


def write_original(folder, *, heads=4, kv_heads=2, bias=False, rope_theta=10000.0, rope_scaling=None,
                   max_positions=64, tie=False, shards=1, seed=0, **config_overrides) -> tuple[dict, dict]:
    """A random InternLM2 checkpoint in the original layout (config.json + safetensors) in ``folder``."""
    head_dim = HIDDEN // heads
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "attn_implementation": "eager", "bias": bias, "hidden_act": "silu", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta, "rope_scaling": rope_scaling, "vocab_size": VOCAB, "tie_word_embeddings": tie,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, **config_overrides,
    }
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, scale=0.2, offset=0.0):
        return offset + scale * torch.randn(*size, generator=gen)

    qkv_rows = (heads + 2 * kv_heads) * head_dim
    tensors = {"model.tok_embeddings.weight": rand(VOCAB, HIDDEN, scale=1.0),
               "model.norm.weight": rand(HIDDEN, scale=0.1, offset=1.0)}
    if not tie:
        tensors["output.weight"] = rand(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors.update({
            p + "attention.wqkv.weight": rand(qkv_rows, HIDDEN),
            p + "attention.wo.weight": rand(HIDDEN, heads * head_dim),
            p + "attention_norm.weight": rand(HIDDEN, scale=0.1, offset=1.0),
            p + "ffn_norm.weight": rand(HIDDEN, scale=0.1, offset=1.0),
            p + "feed_forward.w1.weight": rand(INTERMEDIATE, HIDDEN),
            p + "feed_forward.w3.weight": rand(INTERMEDIATE, HIDDEN),
            p + "feed_forward.w2.weight": rand(HIDDEN, INTERMEDIATE),
        })
        if bias:
            tensors[p + "attention.wqkv.bias"] = rand(qkv_rows)
            tensors[p + "attention.wo.bias"] = rand(HIDDEN)
    save_original(folder, config, tensors, shards=shards)
    return config, tensors


def save_original(folder, config, tensors, *, shards=1) -> None:
    """Write config.json and ``tensors`` split over ``shards`` safetensors files (with an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        file = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * per_shard:(s + 1) * per_shard]
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ------------------------------------------------------------- independent reference of the original model
def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x):
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([-second, first], dim=-1)


def _rotary_cos_sin(config, length):
    """cos/sin [length, head_dim] as InternLM2's rotary classes make them for a ``length``-token call."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    base = config["rope_theta"]
    positions = torch.arange(length, dtype=torch.float64)
    scaling = config["rope_scaling"] or {}
    if scaling.get("type") == "linear":
        positions = positions / scaling["factor"]
    if scaling.get("type") == "dynamic" and length > config["max_position_embeddings"]:
        f, limit = scaling["factor"], config["max_position_embeddings"]
        base = base * ((f * length / limit) - (f - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def reference_logits(config, tensors, ids):
    """Float64 logits of the original InternLM2 network, reading the original tensors.

    Query head ``h`` sits in wqkv block ``h // n_rep`` at slot ``h % n_rep``; the block's key and value
    follow its queries. Rows are picked by explicit index arithmetic (the converter reshapes)."""
    t = {name: value.double() for name, value in tensors.items()}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, n_rep, eps = config["hidden_size"] // heads, heads // kv_heads, config["rms_norm_eps"]
    block = (n_rep + 2) * head_dim
    batch, length = ids.shape
    cos, sin = _rotary_cos_sin(config, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    x = t["model.tok_embeddings.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, t[p + "attention_norm.weight"], eps)
        qkv = h @ t[p + "attention.wqkv.weight"].T
        if config["bias"]:
            qkv = qkv + t[p + "attention.wqkv.bias"]

        def rows(start):
            return qkv[..., start:start + head_dim]

        head_outputs = []
        for head in range(heads):
            group = head // n_rep
            q = rows(group * block + (head % n_rep) * head_dim)
            k = rows(group * block + n_rep * head_dim)
            v = rows(group * block + (n_rep + 1) * head_dim)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
            scores = scores.masked_fill(~causal, float("-inf"))
            head_outputs.append(scores.softmax(-1) @ v)
        attn = torch.cat(head_outputs, dim=-1) @ t[p + "attention.wo.weight"].T
        if config["bias"]:
            attn = attn + t[p + "attention.wo.bias"]
        x = x + attn
        h = _rms_norm(x, t[p + "ffn_norm.weight"], eps)
        gate, up = h @ t[p + "feed_forward.w1.weight"].T, h @ t[p + "feed_forward.w3.weight"].T
        x = x + (F.silu(gate) * up) @ t[p + "feed_forward.w2.weight"].T
    x = _rms_norm(x, t["model.norm.weight"], eps)
    output = t["model.tok_embeddings.weight"] if config["tie_word_embeddings"] else t["output.weight"]
    return x @ output.T


def _ids(batch, length, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _load(dst):
    return LlamaForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------- tests
CASES = {
    "gqa2": dict(heads=4, kv_heads=2),
    "mha-tied": dict(heads=4, kv_heads=4, tie=True),
    "bias-sharded": dict(heads=4, kv_heads=2, bias=True, shards=2),
    "gqa4-linear": dict(heads=8, kv_heads=2, rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}),
    "dynamic": dict(heads=4, kv_heads=2, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.5},
                    max_positions=8),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_converted_logits_match_original_reference(tmp_path, case):
    config, tensors = write_original(tmp_path / "src", **CASES[case])
    summary = convert_internlm2(tmp_path / "src", tmp_path / "dst")
    model = _load(tmp_path / "dst")
    assert model.config.num_key_value_heads == config["num_key_value_heads"]
    assert model.config.attention_bias == config["bias"]
    lengths = (6, 13) if case == "dynamic" else (13,)  # 13 > max_position_embeddings=8: the scaled base
    for length in lengths:
        ids = _ids(2, length)
        expected = reference_logits(config, tensors, ids)
        torch.testing.assert_close(model(ids).logits.double(), expected, rtol=1e-4, atol=1e-4)
    assert "InternLM2 -> LlamaForCausalLM" in summary and "tokenizer" in summary
    if config["rope_scaling"]:
        assert model.config.rope_parameters["rope_type"] == config["rope_scaling"]["type"]
        assert model.config.rope_parameters["factor"] == config["rope_scaling"]["factor"]
    assert model.config.rope_parameters["rope_theta"] == config["rope_theta"]


@torch.no_grad()
def test_dynamic_rope_differs_exactly_where_documented(tmp_path):
    """Transformers keeps the largest dynamic-NTK base of the calls so far (until a call within
    max_position_embeddings); InternLM2 computes it per call. A long call after a longer one differs; a call
    within the limit resets, and the long call matches again."""
    config, tensors = write_original(tmp_path / "src", **CASES["dynamic"])  # max_position_embeddings 8
    convert_internlm2(tmp_path / "src", tmp_path / "dst")
    model = _load(tmp_path / "dst")
    ids = _ids(1, 16)
    expected = reference_logits(config, tensors, ids[:, :13])
    torch.testing.assert_close(model(ids[:, :13]).logits.double(), expected, rtol=1e-4, atol=1e-4)  # first call
    model(ids)  # 16 tokens: a larger base, kept
    assert (model(ids[:, :13]).logits.double() - expected).abs().max() > 1e-3  # the documented difference
    model(ids[:, :6])  # within the limit: back to the plain base
    torch.testing.assert_close(model(ids[:, :13]).logits.double(), expected, rtol=1e-4, atol=1e-4)


def _marked_checkpoint(folder, heads, kv_heads, bias):
    config, tensors = write_original(folder, heads=heads, kv_heads=kv_heads, bias=bias)
    rows = tensors["model.layers.1.attention.wqkv.weight"].shape[0]
    tensors["model.layers.1.attention.wqkv.weight"] = torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, HIDDEN)
    if bias:
        tensors["model.layers.1.attention.wqkv.bias"] = torch.arange(rows, dtype=torch.float32)
    save_original(folder, config, tensors)


def _row_ids(*ranges):
    return torch.cat([torch.arange(start, stop) for start, stop in ranges]).float()


# Original wqkv rows per projection, written out by hand from the layout (head_dim 16).
MARKED = {
    # H=4, G=2: blocks of 64 rows = [q0 q1 k0 v0] [q2 q3 k1 v1]
    (4, 2): dict(q=[(0, 32), (64, 96)], k=[(32, 48), (96, 112)], v=[(48, 64), (112, 128)]),
    # H=4, G=4: blocks of 48 rows = [q_g k_g v_g]
    (4, 4): dict(q=[(0, 16), (48, 64), (96, 112), (144, 160)], k=[(16, 32), (64, 80), (112, 128), (160, 176)],
                 v=[(32, 48), (80, 96), (128, 144), (176, 192)]),
    # H=4, G=1: one block of 96 rows = [q0 q1 q2 q3 k v]
    (4, 1): dict(q=[(0, 64)], k=[(64, 80)], v=[(80, 96)]),
}


@pytest.mark.parametrize("heads,kv_heads", list(MARKED))
def test_wqkv_rows_land_in_the_expected_projection_rows(tmp_path, heads, kv_heads):
    _marked_checkpoint(tmp_path / "src", heads, kv_heads, bias=True)
    convert_internlm2(tmp_path / "src", tmp_path / "dst")
    out = load_file(str(tmp_path / "dst" / "model.safetensors"))
    for proj, ranges in MARKED[(heads, kv_heads)].items():
        expected = _row_ids(*ranges)
        weight = out[f"model.layers.1.self_attn.{proj}_proj.weight"]
        assert torch.equal(weight, expected[:, None].expand(-1, HIDDEN)), proj
        assert torch.equal(out[f"model.layers.1.self_attn.{proj}_proj.bias"], expected), proj


def test_other_tensors_are_renamed_unchanged(tmp_path):
    config, tensors = write_original(tmp_path / "src", bias=True)
    inv_freq = {"model.layers.0.attention.rotary_emb.inv_freq": torch.ones(8)}  # as some old exports hold
    save_original(tmp_path / "src", config, {**tensors, **inv_freq})
    summary = convert_internlm2(tmp_path / "src", tmp_path / "dst")
    assert "dropped 1 rotary inv_freq buffer" in summary
    out = load_file(str(tmp_path / "dst" / "model.safetensors"))
    pairs = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight",
             "model.layers.0.attention.wo.weight": "model.layers.0.self_attn.o_proj.weight",
             "model.layers.0.attention.wo.bias": "model.layers.0.self_attn.o_proj.bias",
             "model.layers.0.attention_norm.weight": "model.layers.0.input_layernorm.weight",
             "model.layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
             "model.layers.0.feed_forward.w1.weight": "model.layers.0.mlp.gate_proj.weight",
             "model.layers.0.feed_forward.w3.weight": "model.layers.0.mlp.up_proj.weight",
             "model.layers.0.feed_forward.w2.weight": "model.layers.0.mlp.down_proj.weight"}
    for old, new in pairs.items():
        assert torch.equal(out[new], tensors[old]), old
    assert len(out) == 3 + LAYERS * 13  # per layer: q/k/v/o weight + bias, 2 norms, 3 MLP weights


def test_small_shards_are_written_with_an_index(tmp_path):
    config, tensors = write_original(tmp_path / "src")
    summary = convert_internlm2(tmp_path / "src", tmp_path / "dst", shard_bytes=20_000)
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "file(s)" in summary
    ids = _ids(1, 7)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "dst")(ids).logits.double(), reference_logits(config, tensors, ids),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,error,match", [
    (dict(model_type="llama"), ValueError, "model_type is 'llama'"),
    (dict(model_type="internlm"), ValueError, r"InternLM \(v1\)"),
    (dict(architectures=["InternLM2ForRewardModel"]), ValueError, "InternLM2ForRewardModel"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), ValueError, "rope_scaling"),
    (dict(rope_scaling={"type": "dynamic"}), ValueError, "factor"),
    (dict(num_key_value_heads=3), ValueError, "not a multiple of num_key_value_heads=3"),
    (dict(hidden_act="gelu"), ValueError, "hidden_act"),
])
def test_unsupported_configs_are_refused(tmp_path, change, error, match):
    config, tensors = write_original(tmp_path / "src")
    save_original(tmp_path / "src", {**config, **change}, tensors)
    with pytest.raises(error, match=match):
        convert_internlm2(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    config, tensors = write_original(tmp_path / "src")
    missing = dict(tensors)
    del missing["model.layers.1.ffn_norm.weight"]
    save_original(tmp_path / "src", config, missing)
    with pytest.raises(ValueError, match="model.layers.1.ffn_norm.weight"):
        convert_internlm2(tmp_path / "src", tmp_path / "dst")
    save_original(tmp_path / "src", config, {**tensors, "model.layers.0.attention.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="model.layers.0.attention.extra.weight"):
        convert_internlm2(tmp_path / "src", tmp_path / "dst")
    bad = {**tensors, "model.layers.0.feed_forward.w2.weight": torch.zeros(HIDDEN, INTERMEDIATE + 1)}
    save_original(tmp_path / "src", config, bad)
    with pytest.raises(ValueError, match="feed_forward.w2.weight"):
        convert_internlm2(tmp_path / "src", tmp_path / "dst")


def test_folder_with_only_bin_files_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "internlm2"}))
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        convert_internlm2(src, tmp_path / "dst")


def test_same_folder_is_refused(tmp_path):
    write_original(tmp_path / "src")
    with pytest.raises(ValueError, match="different folder"):
        convert_internlm2(tmp_path / "src", tmp_path / "src")


def test_command_line_prints_summary_and_copies_tokenizer(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_original(src, rope_scaling={"type": "dynamic", "factor": 2.0})
    (src / "tokenizer.model").write_bytes(b"\x00sentencepiece stand-in")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "InternLM2Tokenizer"}))
    (src / "tokenization_internlm2.py").write_text("# remote code stand-in\n")
    main(["internlm2", str(src), str(dst)])
    printed = capsys.readouterr().out
    assert "InternLM2 -> LlamaForCausalLM" in printed
    assert "dynamic NTK" in printed and "trust_remote_code=True" in printed
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_internlm2.py"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
        assert name in printed


@torch.no_grad()
def test_converted_model_can_be_patched(tmp_path):
    write_original(tmp_path / "src", heads=4, kv_heads=2)
    convert_internlm2(tmp_path / "src", tmp_path / "dst")
    model = _load(tmp_path / "dst")
    ids = _ids(2, 20)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)

    patch_model(model, Profile.all_dense(model))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
    unpatch_model(model)

    profile = Profile.from_scores(model, torch.rand(LAYERS, 2, generator=torch.Generator().manual_seed(0)))
    patch_model(model, profile, SparseConfig(streaming_fraction=0.5, sink_size=2, local_size=8))
    sparse = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert sparse.shape == expected.shape and torch.equal(sparse[:, :20], ids)
    assert ((sparse >= 0) & (sparse < VOCAB)).all()
    unpatch_model(model)
