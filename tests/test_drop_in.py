"""Drop-in: every call stock serves, a patched model serves (sparsely where it can, else exactly as stock, saying
so once); patching is atomic and leaves shared configs alone; copies generate with their own weights."""

import copy
import gc
import logging
import tempfile

import pytest
import torch
from helpers import random_ids, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache, LlamaForSequenceClassification, LlamaModel

from sparse_attn_hf import Profile, SparseCache, SparseConfig, last_call, patch_model, unpatch_model
from sparse_attn_hf.compat import CACHE_ARG, cache_of

pytestmark = pytest.mark.compat


def _sparse(model, **settings):
    """A sparse profile with a small window, so that the sparse path changes answers on tiny inputs."""
    scores = torch.rand(model.config.num_hidden_layers, model.config.num_key_value_heads,
                        generator=torch.Generator().manual_seed(3))
    return patch_model(model, Profile.from_scores(model, scores), SparseConfig(
        streaming_fraction=0.5, sink_size=2, local_size=8, decode_local_size=4, streaming_from=0, **settings))


def _greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=6, do_sample=False, **kwargs)


@torch.no_grad()
def test_a_deep_copy_generates_with_its_own_weights():
    model = _sparse(tiny_model("llama", seed=0))
    ids = random_ids(1, 40)
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.mul_(1.5)  # other weights: other tokens
    reference = _sparse(unpatch_model(copy.deepcopy(twin)))  # the twin's weights, patched the same way anew
    expected = _greedy(reference, ids)
    assert not torch.equal(expected, _greedy(model, ids))
    del model
    gc.collect()  # the original is gone: the copy must not need it
    assert torch.equal(_greedy(twin, ids), expected)
    assert last_call(twin).cache_bytes is not None  # it built its own SparseCache
    unpatch_model(twin)
    assert "generate" not in vars(twin) and not twin._forward_pre_hooks


@torch.no_grad()
def test_save_pretrained_and_reload_is_cleanly_unpatched():
    model = tiny_model("llama")
    ids = random_ids(1, 20)
    expected = _greedy(model, ids)
    _sparse(model)
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.config._attn_implementation != "sparse_attn_hf"
    assert torch.equal(_greedy(loaded, ids), expected)


@torch.no_grad()
def test_a_shared_config_is_left_alone():
    model = tiny_model("llama")
    config = model.config
    sibling = type(model)(config).eval()  # another model built from the same config object
    ids = random_ids(1, 30)
    expected = _greedy(sibling, ids)
    _sparse(model)
    assert config._attn_implementation == "sdpa" and model.config is not config
    assert torch.equal(_greedy(sibling, ids), expected)  # still stock
    _sparse(sibling)
    unpatch_model(model)
    assert model.config is config and config._attn_implementation == "sdpa"
    assert sibling.config._attn_implementation == "sparse_attn_hf"  # the other patch is untouched
    unpatch_model(sibling)
    assert torch.equal(_greedy(sibling, ids), expected)


@pytest.mark.parametrize("head", [LlamaModel, LlamaForSequenceClassification])
@torch.no_grad()
def test_models_without_generate_patch_and_match_stock(head):
    causal = tiny_model("llama")
    model = head(causal.config).eval()
    ids = random_ids(2, 25)
    expected = model(ids)
    expected = expected.last_hidden_state if head is LlamaModel else expected.logits
    patch_model(model, Profile.all_dense(model))
    out = model(ids)
    out = out.last_hidden_state if head is LlamaModel else out.logits
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert "generate" not in vars(model)
    unpatch_model(model)


def test_a_failed_patch_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    before = (model.config, model.config._attn_implementation, dict(vars(model)).keys())
    with pytest.raises(ValueError):
        patch_model(model, Profile.all_dense(tiny_model("llama", layers=3)))  # a profile for another shape
    assert (model.config, model.config._attn_implementation, dict(vars(model)).keys()) == before
    assert not model._forward_pre_hooks and not hasattr(model, "_sparse_attn_state")


@torch.no_grad()
def test_attention_switched_after_patching_runs_as_stock(caplog):
    model = tiny_model("llama")
    ids = random_ids(1, 30)
    expected = _greedy(model, ids)
    _sparse(model)
    model.set_attn_implementation("sdpa")
    with caplog.at_level(logging.WARNING, logger="sparse_attn_hf"):
        assert torch.equal(_greedy(model, ids), expected)
    assert "runs as stock" in caplog.text
    cache = SparseCache(model)
    with pytest.raises(ValueError, match="set_attn_implementation"):
        model(ids, **{CACHE_ARG: cache})


@torch.no_grad()
def test_a_sparse_cache_used_after_unpatch_is_refused():
    model = _sparse(tiny_model("llama"))
    cache = SparseCache(model)
    unpatch_model(model)
    with pytest.raises(ValueError, match="no longer runs it"):
        model(random_ids(1, 5), **{CACHE_ARG: cache})


@torch.no_grad()
def test_output_attentions_runs_as_stock_eager():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    ids = random_ids(1, 30)
    expected = model(ids, output_attentions=True)
    _sparse(model)
    out = model(ids, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for got, want in zip(out.attentions, expected.attentions):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.logits, expected.logits)
    assert "output_attentions" in last_call(model).stock
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, output_attentions=True,
                               return_dict_in_generate=True)
    assert len(generated.attentions) == 3 and generated.attentions[0][0] is not None
    assert model.config._attn_implementation == "sparse_attn_hf"  # back after the call


@torch.no_grad()
def test_masks_stock_accepts_are_served_as_stock():
    model = tiny_model("llama", heads=4, kv_heads=2)
    ids = random_ids(2, 24)
    right = torch.ones(2, 24, dtype=torch.long)
    right[1, 17:] = 0  # right padding
    gap = torch.ones(2, 24, dtype=torch.long)
    gap[0, 5:8] = 0  # a pad id inside a prompt
    four_d = torch.tril(torch.ones(24, 24, dtype=torch.bool))[None, None].expand(2, 1, 24, 24).clone()
    four_d[:, :, :, 3] = False
    packed = torch.cat([torch.arange(10), torch.arange(14)])[None].expand(2, -1)
    calls = [dict(attention_mask=right), dict(attention_mask=gap), dict(attention_mask=four_d),
             dict(position_ids=packed)]
    expected = [model(ids, **kw).logits for kw in calls]
    expected_generate = _greedy(model, ids, attention_mask=right)
    _sparse(model)
    for kw, want in zip(calls, expected):
        torch.testing.assert_close(model(ids, **kw).logits, want, rtol=1e-4, atol=1e-5)
        assert last_call(model).stock is not None
    assert torch.equal(_greedy(model, ids, attention_mask=right), expected_generate)


@pytest.mark.parametrize("implementation", ["dynamic", "hybrid", "static"])
@torch.no_grad()
def test_cache_implementations_a_sparse_cache_honours(implementation):
    """A checkpoint's generation_config.cache_implementation (Gemma 3 ships "hybrid") is honoured by a SparseCache:
    window layers keep their window, the streaming heads their sink + window; all-dense equals stock."""
    model = tiny_model("gemma3", layers=4)
    model.generation_config.cache_implementation = implementation
    ids = random_ids(1, 40)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    patch_model(model, Profile.all_dense(model))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(cache_of(out), SparseCache)
    assert torch.equal(out.sequences, expected)
    assert last_call(model).stock is None


@torch.no_grad()
def test_cache_implementations_it_cannot_store_in_run_as_stock(caplog):
    model = tiny_model("llama")
    ids = random_ids(1, 30)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="hybrid_chunked")
    _sparse(model)
    with caplog.at_level(logging.WARNING, logger="sparse_attn_hf"):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="hybrid_chunked")
    assert torch.equal(out, expected)
    assert "hybrid_chunked" in last_call(model).stock and "hybrid_chunked" in caplog.text


@torch.no_grad()
def test_assisted_decoding_and_prompt_lookup_run_as_stock():
    model, assistant = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = random_ids(1, 30)
    expected = _greedy(model, ids)
    looked_up = _greedy(model, ids, prompt_lookup_num_tokens=3)
    _sparse(model)
    assert torch.equal(_greedy(model, ids, assistant_model=assistant), expected)
    assert torch.equal(_greedy(model, ids, prompt_lookup_num_tokens=3), looked_up)
    assert "assisted" in last_call(model).stock


@torch.no_grad()
def test_a_fixed_slot_cache_runs_as_stock():
    from transformers import StaticCache

    model = tiny_model("llama")
    ids = random_ids(1, 20)
    expected = model(ids, **{CACHE_ARG: StaticCache(config=model.config, max_cache_len=64)}).logits
    _sparse(model)
    got = model(ids, **{CACHE_ARG: StaticCache(config=model.config, max_cache_len=64)}).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert "StaticCache" in last_call(model).stock
    # a DynamicCache returns every token in order: served by the package's attention
    model(ids, **{CACHE_ARG: DynamicCache(config=model.config)})
