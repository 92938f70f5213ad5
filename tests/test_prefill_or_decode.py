"""A forward is a decode step only inside generate()'s decoding loop (or SparseCache.decoding()): every
prompt token, however it is chunked, goes through the prefill rule, exactly as in one piece."""

import pytest
import torch
from conftest import DEVICE
from helpers import random_ids, tiny_model
from transformers import DynamicCache

from sparse_attn_hf import Profile, SparseCache, SparseConfig, patch_model
from sparse_attn_hf.compat import CACHE_ARG

pytestmark = pytest.mark.compat  # also run on the oldest supported Transformers (.ci/run)

# decode window (4) < local window (16) and a budget (2 pages of 16) far below the prompt: a prompt token
# mistaken for a decode step would see fewer keys and change the logits
SETTINGS = SparseConfig(sink_size=2, local_size=16, decode_local_size=4, page_size=16, logical_page_size=4,
                        token_budget=32, reuse_interval=2, streaming_fraction=0.5, streaming_from=0,
                        page_selection="always")
PROMPT = 41


@pytest.fixture(scope="module")
def model():
    model = tiny_model("llama", heads=6, kv_heads=2, layers=3).to(DEVICE)
    scores = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    return patch_model(model, Profile.from_scores(model, scores), SETTINGS)


def _generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                          **kwargs)


@torch.no_grad()
@pytest.mark.parametrize("pieces", [[(0, 1), (1, 41)], [(0, 20), (20, 21), (21, 41)], [(0, 40), (40, 41)]],
                         ids=["first", "middle", "last"])
def test_one_token_chunks_are_prefill(model, pieces):
    ids = random_ids(1, PROMPT).to(DEVICE)
    expected = model(ids).logits
    cache = SparseCache(model)
    got = torch.cat([model(ids[:, a:b], **{CACHE_ARG: cache}).logits for a, b in pieces], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not any("pages" in layer._tensors for layer in cache.layers), "no page selection in prefill"


@torch.no_grad()
def test_generate_with_a_one_token_last_chunk_equals_one_shot(model):
    ids = random_ids(1, PROMPT).to(DEVICE)
    one_shot = _generate(model, ids)
    chunked = _generate(model, ids, prefill_chunk_size=10)  # chunks 10, 10, 10, 10, 1
    assert torch.equal(chunked.sequences, one_shot.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(one_shot.logits), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one_shot.logits[0], model(ids).logits[:, -1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_model_prefill_then_generate_feeds_the_last_prompt_token_as_prefill(model):
    ids = random_ids(1, PROMPT).to(DEVICE)
    one_shot = _generate(model, ids)
    cache = SparseCache(model)
    model(ids[:, :-1], **{CACHE_ARG: cache})
    continued = _generate(model, ids, **{CACHE_ARG: cache})
    assert torch.equal(continued.sequences, one_shot.sequences)
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(one_shot.logits), rtol=1e-4, atol=1e-5)
    assert cache.sequence.decode_from is None, "generate() leaves the cache in prefill mode"


@torch.no_grad()
def test_manual_loop_decodes_only_when_marked(model):
    ids = random_ids(1, PROMPT).to(DEVICE)
    expected = _generate(model, ids)
    steps = len(expected.logits)

    def loop(cache, marked: bool):
        logits, tokens = model(ids, **{CACHE_ARG: cache}).logits[:, -1], []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            if marked:
                with cache.decoding():
                    logits = model(token, **{CACHE_ARG: cache}).logits[:, -1]
            else:
                logits = model(token, **{CACHE_ARG: cache}).logits[:, -1]
        return torch.cat(tokens, dim=1)

    marked = SparseCache(model)
    assert torch.equal(loop(marked, marked=True), expected.sequences[:, PROMPT:])
    assert any("pages" in layer._tensors for layer in marked.layers), "marked steps select pages"
    # unmarked one-token calls are prefill: the static rule at every step, as with a DynamicCache
    assert torch.equal(loop(SparseCache(model), marked=False), loop(DynamicCache(config=model.config), marked=False))


@torch.no_grad()
def test_decoding_block_restores_the_mode(model):
    cache = SparseCache(model)
    model(random_ids(1, 10).to(DEVICE), **{CACHE_ARG: cache})
    with cache.decoding():
        assert cache.sequence.decode_from == 10
        with cache.decoding(prompt_end=12):
            assert cache.sequence.is_decode_step(12, 1) and not cache.sequence.is_decode_step(11, 1)
        assert cache.sequence.decode_from == 10
    assert cache.sequence.decode_from is None
    assert not cache.sequence.is_decode_step(10, 1)


@pytest.mark.parametrize("length", [161, 40], ids=["window-binds", "short-prompt-dense"])
@torch.no_grad()
def test_chunking_never_changes_the_answer_at_the_default_shortcut(length):
    """With the cost model deciding (streaming_from None), whether a short prompt runs every head dense is decided
    from the whole prompt, never from one chunk: generate() with prefill_chunk_size gives the one-shot logits, for
    a prompt past the break-even (161 tokens, sink 2 + local 16: the window) and one below it (40 tokens: dense,
    the ring holding the whole prompt for its later chunks)."""
    model = tiny_model("llama", heads=6, kv_heads=2, layers=3).to(DEVICE)
    scores = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(
        sink_size=2, local_size=16, decode_local_size=4, streaming_fraction=0.5))
    ids = random_ids(1, length, seed=4).to(DEVICE)
    one_shot = _generate(model, ids)
    chunked = _generate(model, ids, prefill_chunk_size=16 if length == 40 else 40)
    torch.testing.assert_close(chunked.logits[0], one_shot.logits[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked.sequences, one_shot.sequences)
    if length == 40:  # below the break-even the prompt ran dense: stock's logits
        unpatched = tiny_model("llama", heads=6, kv_heads=2, layers=3).to(DEVICE)
        torch.testing.assert_close(one_shot.logits[0], unpatched(ids).logits[:, -1], rtol=1e-4, atol=1e-5)
