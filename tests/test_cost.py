"""The prefill cost model: a sparse path runs only where it is predicted to beat dense attention, and the
decisions show in the output (dense where dense, sparse where sparse)."""

import pytest
import torch
from conftest import DEVICE
from helpers import random_ids, tiny_model

from sparse_attn_hf import Profile, SparseConfig, cost, patched
from sparse_attn_hf.methods.sample_attention import SampleSettings, sample_attention_mask
from sparse_attn_hf.ops import LogitTerms, Visibility
from sparse_attn_hf.stripe_mask import StripeMask


def test_pair_counts_match_loops():
    for q_first, q_len, span in ((0, 9, 4), (5, 7, 3), (2, 3, 50), (10, 4, 11)):
        rows = range(q_first, q_first + q_len)
        assert cost.causal_elements(q_first, q_len) == sum(p + 1 for p in rows)
        assert cost.window_elements(q_first, q_len, span) == sum(min(p + 1, span) for p in rows)


def test_streaming_pays_past_the_break_even_only():
    sink, local = 128, 4096
    assert not cost.streaming_pays(0, 8192, sink, local)  # the window covers 77% of causal attention
    assert cost.streaming_pays(0, 16384, sink, local)
    assert cost.streaming_pays(0, 131072, sink, local)
    assert not cost.streaming_pays(0, 4000, sink, local)  # the window is everything
    assert cost.streaming_pays(500_000, 32768, sink, local)  # a late chunk of a long prompt


def _mask(window: int, stripes: list[int], k_len: int) -> StripeMask:
    padded = torch.tensor([[stripes + [k_len] * 2]], dtype=torch.int32)
    return StripeMask(window=torch.tensor([[window]]), stripes=padded, counts=torch.tensor([[len(stripes)]],
                      dtype=torch.int32), q_len=k_len, k_len=k_len, kv_start=torch.zeros(1, dtype=torch.long))


def test_stripe_cost_counts_window_and_stripe_pairs():
    k_len = 1000
    density, predicted = cost.stripe_cost(_mask(k_len, [], k_len), 0)  # the window is the causal matrix
    assert density == pytest.approx(1.0) and predicted == pytest.approx(cost.BLOCK_RATE)
    density, predicted = cost.stripe_cost(_mask(10, [0, 500], k_len), 0)
    causal = k_len * (k_len + 1) / 2
    window = cost.window_elements(0, k_len, 10)
    stripes = (k_len - 0 - 10) + (k_len - 500 - 10)  # rows past each column's window
    assert density == pytest.approx((window + stripes) / causal)
    assert predicted == pytest.approx((cost.BLOCK_RATE * window + cost.GATHER_RATE * stripes) / causal)
    assert predicted < cost.MARGIN


def test_stripes_in_a_block_dense_with_stripes_cost_the_whole_block():
    k_len, block = 1000, cost.KEY_BLOCK
    crowded = list(range(block, block + 110))  # 110 of one block's 128 columns: visited whole
    _, predicted = cost.stripe_cost(_mask(10, crowded, k_len), 0)
    causal = k_len * (k_len + 1) / 2
    window = cost.window_elements(0, k_len, 10)
    stripes = sum(k_len - c - 10 for c in crowded)
    whole = cost.BLOCK_RATE * block / len(crowded)
    assert whole < cost.GATHER_RATE
    assert predicted == pytest.approx((cost.BLOCK_RATE * window + whole * stripes) / causal)
    _, sparse = cost.stripe_cost(_mask(10, crowded[:10], k_len), 0)  # 10 of 128: gathered
    assert sparse == pytest.approx((cost.BLOCK_RATE * window + cost.GATHER_RATE * sum(k_len - c - 10
                                    for c in crowded[:10])) / causal)


@torch.no_grad()
def test_sample_attention_runs_dense_when_its_mask_does_not_pay_and_sparse_when_it_does():
    model = tiny_model("llama", heads=6, kv_heads=2, layers=2).to(DEVICE)
    ids = random_ids(1, 120).to(DEVICE)
    off = SparseConfig(alpha=1.0)
    with patched(model, Profile.all_dense(model), off):
        dense = model(ids).logits
    # a wide window (rw 0.9) keeps almost everything: predicted dearer than dense, so the layers run dense
    wide = SparseConfig(alpha=0.95, rw=0.9, r_row=0.2, dense_below=0)
    with patched(model, Profile.all_dense(model), wide):
        got = model(ids).logits
        choices = model._sparse_attn_state.sample_choices
        assert set(choices) == {0, 1} and not any(c["sparse"] for c in choices.values())
        assert all(c["predicted_cost"] > cost.MARGIN for c in choices.values())
    torch.testing.assert_close(got, dense)
    # a narrow window and a low alpha: a sparse mask that pays, and the output changes against SampleAttention off
    narrow = SparseConfig(alpha=0.2, rw=0.05, r_row=0.2, dense_below=0)
    with patched(model, Profile.all_dense(model), narrow):
        got = model(ids).logits
        choices = model._sparse_attn_state.sample_choices
        assert all(c["sparse"] and c["density"] < 0.5 for c in choices.values()), choices
    assert not torch.allclose(got, dense, atol=1e-4)


@torch.no_grad()
def test_short_one_shot_prefill_runs_every_head_dense_unless_told():
    """Below the streaming break-even a one-shot prefill is exact (all heads dense); streaming_from=0 keeps
    the window. The cache keeps sink + window either way."""
    model = tiny_model("llama", heads=6, kv_heads=2, layers=2).to(DEVICE)
    ids = random_ids(1, 40).to(DEVICE)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(3))
    with patched(model, Profile.all_dense(model), SparseConfig(alpha=1.0)):
        dense = model(ids).logits
    common = dict(streaming_fraction=0.5, sink_size=2, local_size=16, alpha=1.0)  # window covers 69%
    with patched(model, Profile.from_scores(model, scores), SparseConfig(**common)):
        torch.testing.assert_close(model(ids).logits, dense)
    with patched(model, Profile.from_scores(model, scores), SparseConfig(**common, streaming_from=0)):
        assert not torch.allclose(model(ids).logits, dense, atol=1e-4)


def test_sink_column_is_a_stripe_even_when_the_window_reaches_alpha():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, 2, 64, 16, generator=gen).to(DEVICE)
    kv_start = torch.tensor([0, 5], device=DEVICE)
    mask = sample_attention_mask(q, k, Visibility(kv_start, q_first=0), LogitTerms(0.25),
                                 SampleSettings(alpha=0.01, rw=0.2, r_row=0.25))
    for b, start in enumerate((0, 5)):
        for h in range(2):
            assert start in mask.stripes[b, h, : int(mask.counts[b, h])].tolist()
    assert torch.equal(mask.stripes, torch.sort(mask.stripes, dim=-1).values)


def test_a_prompt_runs_dense_where_the_window_would_not_pay():
    """methods.streaming.dense_prompt: decided from the whole prompt, never from one chunk."""
    from sparse_attn_hf.methods.streaming import dense_prompt

    common = dict(streaming_from=None, sink=64, local=256, window_layer=False, n_stream=2)
    assert dense_prompt(None, first=0, q_len=300, **common) == 300  # the window covers most of a short prompt
    assert dense_prompt(None, first=0, q_len=200_000, **common) == 0  # a long one streams
    assert dense_prompt(300, first=100, q_len=40, **common) == 300  # a chunk of a short prompt: the prompt decides
    assert dense_prompt(300, first=300, q_len=1, **common) == 0  # past the prompt (decode): not this rule's call
    assert dense_prompt(None, first=0, q_len=300, **dict(common, n_stream=0)) == 0  # no streaming head
    assert dense_prompt(None, first=0, q_len=300, **dict(common, window_layer=True)) == 0  # a native window layer
    assert dense_prompt(None, first=0, q_len=300, **dict(common, streaming_from=0)) == 0  # forced on
    assert dense_prompt(None, first=0, q_len=200_000, **dict(common, streaming_from=10**6)) == 200_000  # forced off
