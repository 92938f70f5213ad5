"""patch_model / unpatch_model on every family: an all-dense profile changes nothing."""

import dataclasses
import types

import pytest
import torch
from helpers import WINDOW_FAMILIES, assert_close_by_rule, left_padded, random_ids, tiny_model
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from sparse_attn_hf import Profile, SparseCache, SparseConfig, last_call, patch_model, patched, unpatch_model
from sparse_attn_hf.compat import CACHE_ARG, cache_of

pytestmark = pytest.mark.compat  # also run on the oldest supported Transformers (.ci/run)

FAMILIES = [("llama", 4, 4), ("mistral", 6, 2), ("qwen2", 8, 2), ("internlm3", 16, 1),  # GQA 1, 3, 4, 16
            ("glm", 4, 2), ("glm4", 6, 2), ("qwen3", 6, 2), ("qwen3_moe", 4, 2), ("phi3", 6, 3),
            ("phi3_longrope", 4, 2)]  # LongRoPE: the inputs run past its original 16 positions (long factors)


@pytest.fixture(params=FAMILIES, ids=[f"{f}-gqa{h // k}" for f, h, k in FAMILIES])
def model(request):
    family, heads, kv_heads = request.param
    return tiny_model(family, heads=heads, kv_heads=kv_heads)


def _greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=6, do_sample=False, **kwargs)


@torch.no_grad()
def test_all_dense_reproduces_unpatched_model(model):
    ids = random_ids(2, 33)
    logits = model(ids).logits
    tokens = _greedy(model, ids)
    beams = _greedy(model, ids, num_beams=3)
    with patched(model, Profile.all_dense(model)):
        assert model.config._attn_implementation == "sparse_attn_hf"
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(_greedy(model, ids), tokens)
        assert torch.equal(_greedy(model, ids, num_beams=3), beams)
    assert torch.equal(model(ids).logits, logits)  # unpatched: exactly as before
    assert model.config._attn_implementation == "sdpa"
    assert "generate" not in vars(model) and not hasattr(model, "_sparse_attn_state")


@torch.no_grad()
def test_all_dense_is_exact_past_every_sparsity_threshold():
    """Profile.all_dense is the opt-in for no sparsity at all: a 16.5K-token prompt (past SampleAttention's
    dense_below of 16384) samples nothing and matches stock; decoding past a 4096-token budget selects no page."""
    model = tiny_model("llama", heads=4, kv_heads=2, layers=2)
    ids = random_ids(1, 16500)
    logits = model(ids).logits[:, -8:]
    with patched(model, Profile.all_dense(model)):
        state = model._sparse_attn_state
        assert state.settings.alpha == 1.0 and state.settings.token_budget >= 2**30
        torch.testing.assert_close(model(ids).logits[:, -8:], logits, rtol=1e-4, atol=1e-5)
        assert not state.sample_choices  # SampleAttention never sampled
        out = model.generate(ids[:, :4200], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = cache_of(out)
        assert all("selected" not in layer._tensors for layer in cache.layers)  # no page was ever selected
        record = last_call(model)
        assert record.decode_steps == 2 and not any(p.dense_method != "dense" for p in record.prefill.values())


@torch.no_grad()
def test_all_dense_left_padded_batch_and_continuation():
    model = tiny_model("llama", heads=6, kv_heads=2)
    ids, mask = left_padded(random_ids(3, 21), [0, 7, 3])
    first = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                           return_dict_in_generate=True)
    follow = torch.cat([first.sequences, random_ids(3, 4, seed=9)], dim=1)
    follow_mask = torch.cat([mask, torch.ones(3, follow.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    expected = model.generate(follow, attention_mask=follow_mask, **{CACHE_ARG: cache_of(first)},
                              max_new_tokens=5, do_sample=False)

    patch_model(model, Profile.all_dense(model))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert isinstance(cache_of(out), SparseCache)
    assert torch.equal(out.sequences, first.sequences)
    again = model.generate(follow, attention_mask=follow_mask, **{CACHE_ARG: cache_of(out)},
                           max_new_tokens=5, do_sample=False)
    assert torch.equal(again, expected)
    assert cache_of(out).get_seq_length() == follow.shape[1] + 4  # tokens seen, not stored


@torch.no_grad()
def test_prompt_of_one_token_and_caller_caches():
    model = tiny_model("llama")
    ids = random_ids(1, 1)
    expected = _greedy(model, ids)
    logits = model(random_ids(2, 9)).logits
    with patched(model, Profile.all_dense(model)):
        assert torch.equal(_greedy(model, ids), expected)
        assert torch.equal(_greedy(model, ids, **{CACHE_ARG: DynamicCache(config=model.config)}), expected)
        torch.testing.assert_close(model(random_ids(2, 9), use_cache=False).logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_within_tolerance_rule(dtype):
    ids = random_ids(2, 40)
    golden = tiny_model("llama", heads=8, kv_heads=2, dtype=torch.float64)(ids).logits
    model = tiny_model("llama", heads=8, kv_heads=2, dtype=dtype)
    baseline = model(ids).logits
    with patched(model, Profile.all_dense(model)):
        assert_close_by_rule(model(ids).logits, golden, baseline)


def test_bad_models_are_rejected():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        patch_model(tiny_model("llama", dtype=torch.float64), Profile.all_dense(model))
    patch_model(model, Profile.all_dense(model))
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, Profile.all_dense(model))
    unpatch_model(model)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)
    with pytest.raises(ValueError, match="SparseCache needs a patched model"):
        SparseCache(model)

    windowed = tiny_model("mistral")
    windowed.config.sliding_window = 256  # binds below its 1024 positions
    with pytest.raises(ValueError, match="every layer .* sliding window of 256 tokens: no layer reads the whole"):
        patch_model(windowed, Profile.all_dense(windowed))
    windowed.config.sliding_window = 1024  # no input can exceed it (Phi-3-128k's 262144): full attention
    unpatch_model(patch_model(windowed, Profile.all_dense(windowed)))
    vision = types.SimpleNamespace(config=types.SimpleNamespace(
        get_text_config=lambda decoder: types.SimpleNamespace(model_type="gemma3")))
    with pytest.raises(ValueError, match="gemma3.* bidirectional attention within each image"):
        patch_model(vision)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="'gpt2' .* is not supported"):
        patch_model(gpt2)
    remote = types.SimpleNamespace(config=types.SimpleNamespace(
        get_text_config=lambda decoder: types.SimpleNamespace(model_type="chatglm")))
    with pytest.raises(ValueError, match="convert chatglm"):
        patch_model(remote)


def test_empty_input_is_rejected():
    model = tiny_model("llama")
    with patched(model, Profile.all_dense(model)):
        with pytest.raises(ValueError, match="empty input"):
            model(torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(ValueError, match="empty input"):
            model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    assert not model._forward_pre_hooks


def test_a_model_without_a_shipped_profile_is_calibrated_on_first_use(caplog, monkeypatch):
    """No shipped profile and no profile=: one is calibrated from attention statistics, announced once (how long,
    where, how to make a better one), cached for the next patch (not calibrated again), and used."""
    import logging

    from sparse_attn_hf.profile import first_use

    model = tiny_model("qwen2", heads=4, kv_heads=2, layers=3)
    with caplog.at_level(logging.WARNING, logger="sparse_attn_hf"):
        patch_model(model)
    state = model._sparse_attn_state
    assert state.profile.method.startswith("calibrated on first use")
    # the held-out rule's fraction: no head streams by default, and the WARNING says so and how to stream
    assert first_use.FRACTION == 0 and state.profile.streaming_fraction == 0 and not state.streaming.any()
    assert "calibrated a profile" in caplog.text and "--method duo" in caplog.text
    assert "No head streams" in caplog.text and "streaming_fraction=0.25" in caplog.text
    assert f"choose-fraction {first_use.cache_path(model)}" in caplog.text  # the held-out rule on the user's model
    scores = state.profile.head_score.clone()
    assert scores.unique().numel() > 1  # the statistics ranked the heads: a fraction the user sets streams some
    path = first_use.cache_path(model)
    assert path.is_file()
    unpatch_model(model)
    monkeypatch.setattr(first_use, "calibrate", lambda *a, **k: pytest.fail("calibrated again despite the cache"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparse_attn_hf"):
        patch_model(model, config=SparseConfig(streaming_fraction=0.5))
    assert "using the profile calibrated for this model" in caplog.text  # a later process is told as well
    state = model._sparse_attn_state
    assert torch.equal(state.profile.head_score, scores) and int(state.streaming.sum()) == state.streaming.numel() // 2
    unpatch_model(model)
    other = tiny_model("qwen2", heads=4, kv_heads=2, layers=3, seed=3)  # other weights: another cache entry
    assert first_use.cache_path(other) != path


def test_patched_context_unpatches_on_error():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError):
        with patched(model, Profile.all_dense(model)):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and "generate" not in vars(model)


@torch.no_grad()
def test_sparse_profile_same_through_every_path(model):
    """Half the KV heads streaming: the cache-less forward and SparseCache prefill + decode agree, and
    the streaming heads really change the result (every family, including GLM's partial rotary)."""
    from sparse_attn_hf import SparseConfig

    ids = random_ids(1, 40)
    dense = model(ids).logits
    scores = torch.rand(model.config.num_hidden_layers, model.config.num_key_value_heads,
                        generator=torch.Generator().manual_seed(2))
    with patched(model, Profile.from_scores(model, scores), SparseConfig(streaming_fraction=0.5, sink_size=2,
                                                                          local_size=6)):
        whole = model(ids).logits
        cache = SparseCache(model)
        stepwise = torch.cat([model(ids[:, :30], **{CACHE_ARG: cache}).logits]
                             + [model(ids[:, i : i + 1], **{CACHE_ARG: cache}).logits for i in range(30, 40)], dim=1)
    torch.testing.assert_close(stepwise, whole, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(whole, dense, atol=1e-3)


@torch.no_grad()
def test_no_deprecation_warning_from_the_package():
    """On Transformers 5.24+ the cache keyword is ``cache``: the package passes its caches under the name the
    installed release takes, whichever name the caller used."""
    import warnings

    from sparse_attn_hf.compat import CACHE_ARG, cache_of

    model = tiny_model("llama", heads=6, kv_heads=2)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(3))
    patch_model(model, Profile.from_scores(model, scores))
    ids = random_ids(1, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        expected = _greedy(model, ids)
        for name in ("cache", "past_key_values"):  # either name reaches the cache on any release
            cache = SparseCache(model)
            assert torch.equal(_greedy(model, ids, **{name: cache}), expected)
            assert cache.get_seq_length() == ids.shape[1] + 5
        out = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True)
        assert isinstance(cache_of(out), SparseCache)
        model(ids, **{CACHE_ARG: SparseCache(model)})
    unpatch_model(model)



def test_dense_heads_are_gathered_by_runs_of_consecutive_heads():
    from sparse_attn_hf.attention import _gather_heads

    model = tiny_model("llama", heads=8, kv_heads=4, layers=2)
    patch_model(model, Profile.all_dense(model))
    state = model._sparse_attn_state
    state.streaming = torch.tensor([[False, False, True, False], [True, False, False, True]])
    state._splits.clear()
    assert state.dense_runs(0) == [(0, 2), (3, 4)] and state.dense_runs(1) == [(1, 3)]
    query = torch.randn(2, 9, 8, 16).transpose(1, 2)  # [B, Hq, L, D] over [B, L, Hq, D] memory, as Transformers
    for layer, dense in ((0, [0, 1, 3]), (1, [1, 2])):
        expected = query.unflatten(1, (-1, 2)).index_select(1, torch.tensor(dense)).flatten(1, 2)
        got = _gather_heads(query, state.dense_runs(layer), 2)
        assert torch.equal(got, expected) and got.is_contiguous()
    unpatch_model(model)


def test_calibrate_from_the_command_line(tmp_path, capsys):
    from sparse_attn_hf.profiler import cli

    model = tiny_model("llama", heads=4, kv_heads=2, layers=2)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "calibrated.safetensors"
    cli.main(["calibrate", "--model", str(tmp_path / "model"), "--out", str(out), "--probes", "2", "--length", "160",
              "--streaming-fraction", "0.5"])
    profile = Profile.load(out)
    assert profile.method.startswith("calibrated on first use") and "calibrate" in profile.command
    assert profile.head_score.shape == (2, 2) and "wrote" in capsys.readouterr().out
    assert profile.streaming_fraction == 0.5  # the fraction asked for, not the default 0
    patch_model(model, out)  # the file patches the model it was made for
    unpatch_model(model)


def test_warm_up_runs_every_sparse_path_then_leaves_the_model_as_it_was(monkeypatch):
    """``warm_up`` (what ``patch_model`` runs on a CUDA model): one call with every sparse path forced on, one with
    the model's settings; afterwards the settings object, the record and the tokens of a real call are unchanged."""
    from sparse_attn_hf import last_call, warm_up as warm
    from sparse_attn_hf.record import CallRecord

    model = tiny_model(layers=2)
    ids = random_ids(1, 40)
    patch_model(model, Profile.from_scores(model, torch.rand(2, 2), streaming_fraction=0.5, sink_size=2,
                                           local_size=8, decode_local_size=4, page_size=8, logical_page_size=4,
                                           token_budget=32))
    state = model._sparse_attn_state
    assert not warm.wanted(model, state)  # weights on the CPU: patch_model did not warm up
    before = model.generate(ids, max_new_tokens=5, do_sample=False)
    settings = state.settings
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(
        (state.settings.streaming_from, state.settings.token_budget, state.settings.page_selection)))
    monkeypatch.setattr(warm, "PROMPT", 64)
    seconds = warm.warm_up(model, state)
    assert seconds > 0
    # the prompt passes the budget: selection at the model's own budget (the kernels' constants follow it)
    assert warm.prompt_length(settings, 1024) == 64
    forced = (0, settings.token_budget, "always")
    assert warm.forced_settings(settings, 64).alpha == 0.5 and warm.forced_settings(settings, 64).dense_below == 0
    assert warm.forced_settings(settings, 20).token_budget == 2 * settings.page_size  # a prompt within the budget
    dense = warm.forced_settings(SparseConfig().resolve(Profile.all_dense(model)), 64)
    assert dense.alpha == 1.0 and dense.page_selection == "auto" and dense.streaming_from == 0  # nothing to force
    own = (settings.streaming_from, settings.token_budget, settings.page_selection)
    assert forced != own
    assert seen.count(forced) == warm.NEW_TOKENS and seen.count(own) == warm.NEW_TOKENS  # prefill + 5 steps each
    assert state.settings is settings and isinstance(state.record, CallRecord) and not last_call(model).prefill
    assert last_call(model).decode_steps == 0
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), before)
    unpatch_model(model)


def test_warm_up_prompt_passes_the_token_budget_within_limits():
    """The 8B shape's settings (budget 4096, pages of 64): a prompt two pages past the budget, so that the decode
    kernels compile with the budget's constants; a budget past ``LONGEST`` or a short model keeps it short."""
    from sparse_attn_hf import warm_up as warm

    settings = SparseConfig(token_budget=4096, page_size=64, alpha=0.95)
    assert warm.prompt_length(settings, 131072) == 4096 + 128
    assert warm.forced_settings(settings, 4096 + 128).token_budget == 4096
    assert warm.prompt_length(settings, 2048) == 2048 - warm.NEW_TOKENS - 1
    assert warm.forced_settings(settings, 2041).token_budget == 128
    assert warm.prompt_length(SparseConfig(token_budget=32768, page_size=64), 131072) == warm.PROMPT
    assert warm.prompt_length(SparseConfig(page_selection="never"), 131072) == warm.PROMPT


def test_warm_up_is_a_setting_that_only_a_cuda_model_uses():
    model = tiny_model(layers=1)
    patch_model(model, Profile.all_dense(model), SparseConfig(warm_up=False))
    from sparse_attn_hf import warm_up as warm

    state = model._sparse_attn_state
    assert state.settings.warm_up is False and not warm.wanted(model, state)
    state.settings = dataclasses.replace(state.settings, warm_up=True)
    assert not warm.wanted(model, state)  # the CPU
    model.to("meta")
    assert not warm.wanted(model, state)
    unpatch_model(model)


def test_a_failed_warm_up_warns_and_leaves_the_model_patched(monkeypatch, caplog):
    from sparse_attn_hf import warm_up as warm

    model = tiny_model(layers=1)
    patch_model(model, Profile.all_dense(model))
    state = model._sparse_attn_state
    settings = state.settings

    def broken(model, ids, settings):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(warm, "_generate", broken)
    with caplog.at_level("WARNING", logger="sparse_attn_hf"):
        assert warm.warm_up(model, state) is None
    assert "warm-up run on a synthetic prompt failed (RuntimeError: no kernel for this GPU)" in caplog.text
    assert state.settings is settings and model._sparse_attn_state is state
    assert model.generate(random_ids(1, 12), max_new_tokens=2, do_sample=False).shape == (1, 14)
    unpatch_model(model)


@pytest.mark.parametrize("family", [f for f, _, _ in FAMILIES] + list(WINDOW_FAMILIES))
def test_every_family_patches_on_line_one(family, monkeypatch):
    """The README's first example on every family of its table: patch_model(model) with no profile (none is
    shipped for these weights) calibrates one and generate() runs; no family needs profile=."""
    from sparse_attn_hf.profile import first_use

    calibrate = first_use.calibrate
    monkeypatch.setattr(first_use, "calibrate", lambda model, **kw: calibrate(model, count=2, **kw))  # time
    heads, kv_heads = next(((h, k) for f, h, k in FAMILIES if f == family), (4, 2))
    model = tiny_model(family, heads=heads, kv_heads=kv_heads, layers=2)
    ids = random_ids(1, 40)
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    patch_model(model)
    try:
        assert model._sparse_attn_state.profile.method.startswith("calibrated on first use")
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, expected)  # fraction 0: exact prefill; a 44-token context: exact decoding
    finally:
        unpatch_model(model)
