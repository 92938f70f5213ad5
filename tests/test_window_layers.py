"""Hybrid models: native sliding-window layers between full-attention ones (Gemma 3, Ministral, Exaone 4, Qwen2
with use_sliding_window). A window layer is the streaming rule with no sink and local = window on every head;
the profile covers the full-attention layers only."""

from __future__ import annotations

import json
import types

import pytest
import torch
from helpers import WINDOW_FAMILIES, left_padded, random_ids, tiny_model
from transformers import DynamicCache

from sparse_attn_hf import Profile, SparseCache, SparseConfig, patch_model, patched
from sparse_attn_hf.compat import CACHE_ARG
from sparse_attn_hf.models import layer_windows
from sparse_attn_hf.profile import FORMAT_VERSION, covered_layers

WINDOW = 8  # helpers.tiny_model's window
LENGTH = 3 * WINDOW + 5  # prompts longer than the window: it binds


@pytest.fixture(params=WINDOW_FAMILIES)
def model(request):
    return tiny_model(request.param, layers=4)


def _full(model):
    return [i for i, w in enumerate(layer_windows(model.config)) if w is None]


@pytest.mark.compat
@torch.no_grad()
def test_window_layers_equal_stock_in_one_piece_chunked_and_padded(model):
    """All-dense patching reproduces stock sdpa (whose window binds: without it the logits differ), for a
    left-padded batch, and prefilled in chunks on a SparseCache."""
    ids, mask = left_padded(random_ids(2, LENGTH), [0, 5])
    reference = model(ids, attention_mask=mask).logits
    windows = layer_windows(model.config)
    assert any(w == WINDOW for w in windows) and any(w is None for w in windows)
    saved = model.config.sliding_window
    model.config.sliding_window = 4096  # the same weights, a window that does not bind: another result
    try:
        unbound = model(ids, attention_mask=mask).logits
    finally:
        model.config.sliding_window = saved
    assert (unbound - reference)[:, 5 + WINDOW :].abs().max() > 1e-3
    with patched(model, Profile.all_dense(model)):
        one_piece = model(ids, attention_mask=mask).logits
        cache, chunks = SparseCache(model), []
        for a, b in ((0, 7), (7, 18), (18, LENGTH)):
            chunks.append(model(ids[:, a:b], attention_mask=mask[:, :b], **{CACHE_ARG: cache}).logits)
    real = mask.bool()
    torch.testing.assert_close(one_piece[real], reference[real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(chunks, 1)[real], reference[real], atol=2e-5, rtol=1e-4)


@pytest.mark.compat
@torch.no_grad()
def test_generate_equals_unpatched_over_20_tokens(model):
    """fp32 greedy generate(): the patched model's own SparseCache and a DynamicCache (Transformers' sliding layers
    hand the attention function only the window's keys) give stock's tokens."""
    ids = random_ids(2, LENGTH)
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    with patched(model, Profile.all_dense(model)):
        assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False), expected)
        dynamic = DynamicCache(config=model.config)
        assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, **{CACHE_ARG: dynamic}), expected)


def test_window_layers_keep_a_ring_of_the_window_and_decode(model):
    """A window layer stores no sink and a ring of the window's size whatever the length (no decode shrink); a
    full-attention layer keeps its settings (a decode window of 4 here); SparseCache decode works."""
    config = SparseConfig(sink_size=2, local_size=12, decode_local_size=4, token_budget=128, streaming_fraction=0.5)
    with patched(model, Profile.all_dense(model, streaming_fraction=0.5), config):
        cache = SparseCache(model)
        out = model.generate(random_ids(1, LENGTH), max_new_tokens=6, do_sample=False, **{CACHE_ARG: cache})
        assert out.shape[1] == LENGTH + 6
        for layer, window in zip(cache.layers, layer_windows(model.config)):
            if window is not None:
                assert layer.dense_heads == [] and layer.sink_size == 0
                assert layer._tensors["ring_key"].shape[2] == WINDOW and layer._tensors["sink_key"].shape[2] == 0
            elif layer.stream_heads:
                assert layer._tensors["ring_key"].shape[2] == 4 and layer._tensors["sink_key"].shape[2] == 2


@torch.no_grad()
def test_a_sparse_profile_changes_the_output_and_leaves_window_layers_alone(model):
    ids = random_ids(1, LENGTH)
    reference = model(ids).logits
    scores = torch.rand(len(_full(model)), model.config.num_key_value_heads, generator=torch.Generator().manual_seed(0))
    profile = Profile.from_scores(model, scores, streaming_fraction=1.0)
    with patched(model, profile, SparseConfig(sink_size=2, local_size=4, streaming_from=0)):
        state = model._sparse_attn_state
        assert state.streaming.all()  # every head of every layer streams: full ones by the profile, windows natively
        assert [state.rule(i) for i in range(4)] == [(2, 4, 4) if w is None else (0, WINDOW, WINDOW)
                                                     for w in layer_windows(model.config)]
        sparse = model(ids).logits
    assert (sparse - reference).abs().max() > 1e-3


def test_profile_covers_the_full_attention_layers(model, tmp_path):
    full = tuple(_full(model))
    assert covered_layers(model) == full
    profile = Profile.all_dense(model)
    assert profile.layers == full and profile.head_score.shape[0] == len(full)
    per_layer = torch.rand(4, model.config.num_key_value_heads)  # rows for every layer: the window rows dropped
    assert torch.equal(Profile.from_scores(model, per_layer).head_score, per_layer[list(full)])
    labels = Profile.from_scores(model, per_layer, streaming_fraction=1.0).streaming_heads()
    assert labels[list(full)].all() and not labels[[i for i in range(4) if i not in full]].any()
    loaded = Profile.load(profile.save(tmp_path / "p.safetensors"))
    assert loaded.layers == full and torch.equal(loaded.head_score, profile.head_score)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format_version"] == str(FORMAT_VERSION) == "2" and json.loads(metadata["layers"]) == list(full)
    # a profile covering every layer (another model's coverage) does not fit
    everything = Profile(head_score=torch.ones(4, model.config.num_key_value_heads), **_shape(model))
    with pytest.raises(ValueError, match="covered layers: profile \\[0, 1, 2, 3\\], the model's full-attention"):
        patch_model(model, everything)
    from sparse_attn_hf.profiler.report import report_text

    assert f"covers: the full-attention layers {list(full)}" in report_text(profile)


def _shape(model):
    from sparse_attn_hf.profile import model_shape

    return model_shape(model)


def test_format_1_files_load_and_cover_every_layer(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "v1.safetensors"
    save_file({"head_score": torch.rand(3, 2)}, str(path), metadata={
        "format_version": "1", "model_type": "llama", "num_layers": "3", "num_heads": "4", "num_kv_heads": "2",
        "head_dim": "16"})
    assert Profile.load(path).layers == (0, 1, 2)
    save_file({"head_score": torch.rand(2, 2)}, str(path), metadata={
        "format_version": "2", "model_type": "llama", "num_layers": "3", "num_heads": "4", "num_kv_heads": "2",
        "head_dim": "16", "layers": "[2, 1]"})
    with pytest.raises(ValueError, match="layers \\[2, 1\\] must be ascending"):
        Profile.load(path)


@pytest.mark.compat
@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
@torch.no_grad()
def test_soft_capping_and_learned_sinks_matter_and_are_computed(family):
    """Gemma 2's soft-capped logits and GPT-OSS's learned sinks change stock's logits on these tiny models, and the
    patched model (its kernels, here their references) reproduces stock with them, one-shot and decoding."""
    model = tiny_model(family, layers=4)
    ids = random_ids(2, LENGTH)
    reference = model(ids).logits
    attentions = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    saved = [(m.sinks.clone() if family == "gpt_oss" else m.attn_logit_softcapping) for m in attentions]
    for m in attentions:  # without the term
        if family == "gpt_oss":
            m.sinks.fill_(-1e4)
        else:
            m.attn_logit_softcapping = None
    without = model(ids).logits
    for m, value in zip(attentions, saved):
        if family == "gpt_oss":
            m.sinks.copy_(value)
        else:
            m.attn_logit_softcapping = value
    assert (without - reference).abs().max() > 1e-3
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    with patched(model, Profile.all_dense(model)):
        torch.testing.assert_close(model(ids).logits, reference, atol=2e-5, rtol=1e-4)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


def test_models_that_cannot_gain_or_need_missing_terms_are_refused():
    every = tiny_model("ministral", layers=2)
    every.config.layer_types = ["sliding_attention"] * 2
    with pytest.raises(ValueError, match="every layer .* sliding window of 8 tokens: no layer reads the whole"):
        patch_model(every, Profile(head_score=torch.ones(1, 2), layers=(0,), **_shape(every)))
    with pytest.raises(ValueError, match="every layer .* no layer reads the whole"):
        Profile.all_dense(every)
    encoder = tiny_model("gemma3", layers=2)
    encoder.config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention=True .* causal attention only"):
        patch_model(encoder)
    vision = types.SimpleNamespace(config=types.SimpleNamespace(
        get_text_config=lambda decoder: types.SimpleNamespace(model_type="gemma3")))
    with pytest.raises(ValueError, match="bidirectional attention within each image .* gemma3_text, is supported"):
        patch_model(vision)
    chunked = tiny_model("ministral", layers=2)
    chunked.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match="layer types \\['chunked_attention'\\]"):
        patch_model(chunked)


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
def test_profiler_scores_only_the_full_attention_layers(family):
    """Gate training leaves window layers as the model has them; the profile it makes covers the others."""
    from test_profiler import _check_profile_patches, _tokenizer

    from sparse_attn_hf.profile.attention_stats import stats_scores
    from sparse_attn_hf.profiler.calibration import Calibration
    from sparse_attn_hf.profiler.gates import GateSettings, train_gates

    tokenizer = _tokenizer()
    model = tiny_model(family, layers=4, vocab=len(tokenizer))
    calibration = Calibration.from_text(tokenizer, held_out=128)
    result = train_gates(model, calibration, GateSettings(steps=3, lr=0.05, sink=8, local=32, lengths=(200, 260),
                                                          seed=3))
    scores = stats_scores(model, calibration, calibration.samples(2, (200, 260), seed=1), sink=8, local=32,
                          text_tokens=128)
    for made in (result.gates, scores):
        profile = Profile.from_scores(model, made)
        assert profile.layers == tuple(_full(model))
        # the labels drive the full layers, the window layers keep their window (checked against loop-built masks
        # where the family has no learned sinks or soft-capping)
        _check_profile_patches(model, profile, calibration, reference=family not in ("gemma2", "gpt_oss"))


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_prefill_and_decode_within_tolerance_rule(dtype, family):
    """On a GPU the kernels run a window layer (the streaming prefill kernel, the append and decode kernels with
    no sink) and, for Gemma 2 and GPT-OSS, every head with soft-capping or learned sinks: a chunked prefill and 10
    decode steps on a SparseCache stay within the tolerance rule of a float64 stock model fed the same tokens;
    generate() replaying steps from a CUDA graph gives the eager steps' tokens."""
    from conftest import DEVICE
    from helpers import assert_close_by_rule

    ids = random_ids(2, 40).to(DEVICE)
    exact = torch.float32 if family == "gpt_oss" else torch.float64  # GPT-OSS's experts take no float64
    golden = tiny_model(family, layers=4, heads=8, kv_heads=2, dtype=exact).to(DEVICE)(ids).logits
    model = tiny_model(family, layers=4, heads=8, kv_heads=2, dtype=dtype).to(DEVICE)
    baseline = model(ids).logits
    with patched(model, Profile.all_dense(model), SparseConfig(token_budget=128)):
        cache, logits = SparseCache(model), []
        logits.append(model(ids[:, :13], **{CACHE_ARG: cache}).logits)
        logits.append(model(ids[:, 13:30], **{CACHE_ARG: cache}).logits)
        with cache.decoding():
            for t in range(30, 40):
                logits.append(model(ids[:, t : t + 1], **{CACHE_ARG: cache}).logits)
        assert_close_by_rule(torch.cat(logits, 1), golden, baseline)
        graphed = model.generate(ids, max_new_tokens=12, do_sample=False)
    with patched(model, Profile.all_dense(model), SparseConfig(token_budget=128, decode_graphs=False)):
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), graphed)
