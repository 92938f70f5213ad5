"""Streaming heads through every path (no cache, DynamicCache, SparseCache, chunks) and the cache itself."""

import pytest
import torch
from helpers import independent_logits, left_padded, random_ids, tiny_model
from transformers import DynamicCache

from sparse_attn_hf import Profile, SparseCache, SparseConfig, patch_model
from sparse_attn_hf.cache import SparseLayer
from sparse_attn_hf.compat import CACHE_ARG, cache_of

pytestmark = pytest.mark.compat  # also run on the oldest supported Transformers (.ci/run)

SINK, LOCAL = 3, 8
SETTINGS = SparseConfig(sink_size=SINK, local_size=LOCAL, streaming_fraction=0.5)


def _mixed(model):
    """A profile whose lowest-scored half of the KV heads streams (a fixed random split)."""
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    scores = torch.rand(layers, kv_heads, generator=torch.Generator().manual_seed(11))
    return Profile.from_scores(model, scores)


@pytest.fixture
def model():
    model = tiny_model("llama", heads=6, kv_heads=2, layers=3)
    patch_model(model, _mixed(model), SETTINGS)
    return model


@torch.no_grad()
def test_streaming_heads_match_independent_masks(model):
    ids, mask = left_padded(random_ids(2, 30), [0, 6])
    expected = independent_logits(model, ids, mask)
    for cache in (None, DynamicCache(config=model.config), SparseCache(model)):
        logits = model(ids, attention_mask=mask, **{CACHE_ARG: cache}).logits
        real = mask.bool()
        torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_streaming_really_restricts(model):
    ids = random_ids(1, 40)
    sparse = model(ids).logits
    model.set_attn_implementation("sdpa")
    dense = model(ids).logits
    model.set_attn_implementation("sparse_attn_hf")
    assert torch.allclose(sparse[:, : SINK + LOCAL], dense[:, : SINK + LOCAL], atol=1e-5)  # window covers all
    assert (sparse[:, -1] - dense[:, -1]).abs().max() > 1e-3


@torch.no_grad()
def test_sparse_cache_decode_matches_dynamic_cache(model):
    ids, mask = left_padded(random_ids(3, 26), [0, 9, 4])
    common = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    ours = model.generate(ids, **common)
    theirs = model.generate(ids, **{CACHE_ARG: DynamicCache(config=model.config)}, **common)
    assert isinstance(cache_of(ours), SparseCache)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_beam_search_and_sampling_match_dynamic_cache(model):
    ids = random_ids(2, 20)
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, **beams),
                       model.generate(ids, **{CACHE_ARG: DynamicCache(config=model.config)}, **beams))
    sampled = []
    for cache in (None, DynamicCache(config=model.config)):
        torch.manual_seed(3)
        sampled.append(model.generate(ids, max_new_tokens=8, do_sample=True, num_return_sequences=2,
                                      **{CACHE_ARG: cache}))
    assert torch.equal(*sampled)


@pytest.mark.parametrize("chunk", [1, 5, 11])
@torch.no_grad()
def test_chunked_prefill_equals_one_shot(model, chunk):
    ids, mask = left_padded(random_ids(2, 31), [0, 7])
    common = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    one_shot = model.generate(ids, **common)
    chunked = model.generate(ids, prefill_chunk_size=chunk, **common)
    assert torch.equal(one_shot.sequences, chunked.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(one_shot.logits), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_later_chunks_attend_sinks_then_consecutive_slots(model, monkeypatch):
    """Once the ring holds only slots past every row's sinks, a chunk's streaming heads attend to sinks +
    the ring in slot order + the chunk as consecutive slots (the kernel then visits only the window's
    blocks); earlier chunks keep explicit slots. Both give one-shot's logits (the test above)."""
    taken = []
    append = SparseLayer.append

    def spy(self, *args, **kwargs):
        kv = append(self, *args, **kwargs)
        if self.stream_heads:
            taken.append(kv.stream_first)
        return kv

    monkeypatch.setattr(SparseLayer, "append", spy)
    ids, mask = left_padded(random_ids(2, 31), [0, 7])
    model.generate(ids, attention_mask=mask, prefill_chunk_size=11, max_new_tokens=2, do_sample=False)
    # chunk at slot 11: ring not past the padded row's sinks (11 - 8 < 7 + 3); at slot 22 it is
    assert taken.count(None) > 0 and taken.count(SINK + LOCAL) > 0, taken


@torch.no_grad()
def test_manual_chunks_grow_the_cache_past_its_capacity(model):
    ids = random_ids(2, 150)
    expected = model(ids).logits
    cache = SparseCache(model)  # no length hint: starts at one chunk, then doubles
    pieces = [model(ids[:, a:b], **{CACHE_ARG: cache}).logits for a, b in ((0, 10), (10, 75), (75, 76), (76, 150))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 150
    assert all(layer.capacity >= 150 for layer in cache.layers if len(layer.dense_idx))


def _stream_bytes(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for n, t in layer._tensors.items()
               if n.startswith(("sink", "ring")))


@torch.no_grad()
def test_streaming_heads_hold_constant_memory_and_bytes_match_prediction(model):
    ids = random_ids(1, 100)
    short = model.generate(ids[:, :40], max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    long = model.generate(ids, max_new_tokens=29, do_sample=False, return_dict_in_generate=True)
    assert _stream_bytes(cache_of(short)) == _stream_bytes(cache_of(long)) > 0
    cache = cache_of(long)
    length = 128  # 100 prompt + 29 new, the last never fed back: two full 64-token pages, no rounding
    assert cache.get_seq_length() == length
    s = float(model._sparse_attn_state.streaming.float().mean())
    predicted = (1 - s) * (1 + 1 / 16) + s * (SINK + LOCAL) / length
    dynamic = DynamicCache(config=model.config)
    model(long.sequences[:, :length], **{CACHE_ARG: dynamic})
    dynamic_bytes = sum(t.numel() * t.element_size() for layer in dynamic.layers for t in (layer.keys, layer.values))
    assert cache.dynamic_cache_nbytes() == dynamic_bytes
    tables = sum(layer._tensors[name].nbytes for layer in cache.layers  # slot tables, the selection's state
                 for name in ("sink_pos", "ring_pos", "page_scores", "selected", "listed", "pages")
                 if name in layer._tensors)
    measured = (cache.nbytes() - tables) / dynamic_bytes
    assert abs(measured - predicted) < 1e-9, (measured, predicted)
    # while every context the cache can hold fits the budget (4096 > 128 slots), no selection state is allocated
    assert not any(name in layer._tensors for layer in cache.layers for name in ("selected", "listed"))
    assert cache.nbytes() / dynamic_bytes < predicted + 0.02


@torch.no_grad()
def test_selection_state_has_a_fixed_size_when_the_budget_binds():
    model = tiny_model("llama", heads=6, kv_heads=2, layers=3)
    settings = SparseConfig(sink_size=SINK, local_size=LOCAL, streaming_fraction=0.5, token_budget=128,
                            page_selection="always")  # selection runs on a CPU too
    patch_model(model, _mixed(model), settings)
    cache = cache_of(model.generate(random_ids(1, 300), max_new_tokens=20, do_sample=False,
                                    return_dict_in_generate=True))
    # the selection kept between steps and its short list: a fixed size, (1 + shortlist) x the pages selected
    fixed = sum(layer._tensors[name].nbytes for layer in cache.layers for name in ("selected", "listed")
                if name in layer._tensors)
    dense = sum(len(layer.dense_heads) for layer in cache.layers)
    assert dense > 0
    assert fixed == dense * (1 + settings.shortlist) * (settings.token_budget // 64 - 1) * 4


@torch.no_grad()
def test_page_statistics_are_min_max_of_real_keys(model):
    ids, mask = left_padded(random_ids(2, 45), [0, 21])
    cache = SparseCache(model)
    model(ids, attention_mask=mask, **{CACHE_ARG: cache})
    model(random_ids(2, 1), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
          **{CACHE_ARG: cache})
    for layer in (layer for layer in cache.layers if len(layer.dense_idx)):
        keys = layer._tensors["dense_key"][:, :, : layer.seen]
        for b, start in enumerate((0, 21)):
            for page in range(-(-layer.seen // 16)):
                lo, hi = max(page * 16, start), min(page * 16 + 16, layer.seen)
                if lo >= hi:
                    assert torch.isinf(layer._tensors["key_min"][b, :, page]).all()
                    continue
                torch.testing.assert_close(layer._tensors["key_min"][b, :, page], keys[b, :, lo:hi].amin(1))
                torch.testing.assert_close(layer._tensors["key_max"][b, :, page], keys[b, :, lo:hi].amax(1))


def test_cache_misuse_is_rejected(model):
    cache = SparseCache(model)
    with torch.no_grad():
        model(random_ids(2, 5), **{CACHE_ARG: cache})
        with pytest.raises(ValueError, match="batch size 2"):
            model(random_ids(3, 1), **{CACHE_ARG: cache})
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(-1)
        other = tiny_model("llama", heads=6, kv_heads=2, layers=3)
        patch_model(other, _mixed(other), SETTINGS)
        with pytest.raises(ValueError, match="another model"):
            other(random_ids(2, 1), **{CACHE_ARG: cache})
        gap = torch.tensor([[1, 0, 1, 1]])
        with pytest.raises(ValueError, match="cannot be served sparsely"):  # stock could not read the cache
            model(random_ids(1, 4), attention_mask=gap, **{CACHE_ARG: SparseCache(model)})


@torch.no_grad()
@pytest.mark.parametrize("prompt,sizes", [(30, (8, 20, 5)), (5, (8, 3, 16)), (17, (17, 4, 40))])
def test_ring_resize_keeps_the_newest_slots(model, prompt, sizes):
    """Resizing a streaming ring (grow for a prompt run dense, shrink to the decode window) keeps exactly the newest
    slots that both sizes hold, each at index slot % size; every other index is empty (-1, zeros)."""
    cache = SparseCache(model)
    layer = next(layer for layer in cache.layers if layer.stream_heads)
    key, value = torch.randn(2, 1, 2, prompt, 16).unbind(0)
    layer.lazy_initialization(key, value)
    layer.append(key, value, torch.zeros(1, dtype=torch.long), ring=sizes[0])
    held = set(range(max(0, prompt - sizes[0]), prompt))
    for size in sizes[1:]:
        layer._resize_ring(size)
        held &= set(range(prompt - size, prompt))
        t = layer._tensors
        assert t["ring_key"].shape[2] == size
        for index in range(size):
            slot = int(t["ring_pos"][index])
            if slot < 0:
                assert not any(p % size == index for p in held)
                assert not t["ring_key"][:, :, index].any()
                continue
            assert slot in held and slot % size == index
            stream = layer.stream_idx
            torch.testing.assert_close(t["ring_key"][:, :, index], key[:, stream, slot])
            torch.testing.assert_close(t["ring_value"][:, :, index], value[:, stream, slot])
        assert {int(p) for p in t["ring_pos"] if p >= 0} == held
