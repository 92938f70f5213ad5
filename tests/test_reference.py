"""The reference sparse attention against PyTorch's attention with an independently built mask."""

import pytest
import torch
from helpers import assert_close_by_rule, loop_mask, masked_sdpa

from sparse_attn_hf import ops
from sparse_attn_hf.kernels.reference import sparse_attention_reference, visibility_mask
from sparse_attn_hf.ops import LogitTerms, Visibility

SEED_OF = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}

CASES = [
    # batch, q heads, kv heads, q_len, k_len, head_dim, pads, sink, local, tile
    (1, 4, 4, 37, 37, 16, [0], 4, 8, 16),  # GQA 1, length not a tile multiple
    (2, 6, 2, 29, 29, 32, [0, 5], 3, 7, 8),  # GQA 3, left padding
    (2, 8, 2, 5, 41, 16, [2, 0], 4, 6, 4),  # GQA 4, q_len < k_len (chunked prefill)
    (1, 16, 1, 1, 50, 16, [0], 2, 5, 256),  # GQA 16, decode step
    (3, 4, 2, 13, 13, 24, [0, 12, 3], 0, 3, 5),  # no sink, a row with one real token
]


def _inputs(batch, heads, kv_heads, q_len, k_len, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_masked_attention(case, dtype):
    batch, heads, kv_heads, q_len, k_len, head_dim, pads, sink, local, tile = case
    q, k, v = _inputs(batch, heads, kv_heads, q_len, k_len, head_dim, dtype, seed=CASES.index(case) + 100 * SEED_OF[dtype])
    streaming = torch.arange(kv_heads) % 2 == 1  # mixed dense and streaming heads
    slots = torch.arange(k_len)
    q_pos, k_pos = slots[k_len - q_len :].expand(batch, -1), slots.expand(batch, -1)
    kv_start = torch.tensor(pads)
    scale = head_dim**-0.5
    mask = loop_mask(q_pos, k_pos, kv_start, streaming, sink, local)
    assert torch.equal(visibility_mask(q_pos, k_pos, kv_start, streaming, sink, local), mask)

    result = ops.sparse_attention(q, k, v, Visibility(kv_start, streaming=streaming, sink=sink, local=local,
                                                      q_first=k_len - q_len), LogitTerms(scale), tile=tile)
    assert result.shape == (batch, q_len, heads, head_dim) and result.dtype == dtype
    golden = masked_sdpa(q.double(), k.double(), v.double(), mask, scale)
    baseline = masked_sdpa(q, k, v, mask, scale)
    assert_close_by_rule(result, golden, baseline)


def test_streaming_with_window_covering_everything_is_dense():
    q, k, v = _inputs(2, 4, 2, 20, 20, 16, torch.float32, seed=3)
    slots = torch.arange(20).expand(2, -1)
    visible = Visibility(torch.zeros(2, dtype=torch.long), sink=0, q_first=0, k_pos=slots)
    terms = LogitTerms(0.25)
    dense = sparse_attention_reference(q, k, v, visible.but(streaming=torch.tensor([False, False]), local=1), terms)
    wide = sparse_attention_reference(q, k, v, visible.but(streaming=torch.tensor([True, True]), local=20), terms)
    narrow = sparse_attention_reference(q, k, v, visible.but(streaming=torch.tensor([True, True]), local=3), terms)
    torch.testing.assert_close(wide, dense, rtol=0, atol=0)
    assert (narrow - dense).abs().max() > 1e-3  # the window really restricts


def test_empty_slots_and_pad_queries():
    """Key slots marked -1 are never seen; a query on a pad sees nothing and gets zeros."""
    q, k, v = _inputs(1, 2, 1, 4, 6, 8, torch.float32, seed=4)
    q_first = 2  # query slots 2, 3, 4, 5
    kv_start = torch.tensor([3])
    k_pos = torch.tensor([[-1, -1, 2, 3, 4, 5]])
    out = sparse_attention_reference(q, k, v, Visibility(kv_start, streaming=torch.tensor([False]), sink=0, local=1,
                                                         q_first=q_first, k_pos=k_pos), LogitTerms(1.0))
    assert torch.equal(out[0, 0], torch.zeros(2, 8))  # slot 2 is a pad query
    # the query at slot 3 sees only its own key (slot 3): output = v at slot 3
    torch.testing.assert_close(out[0, 1], v[0, 0, 3].expand(2, -1))


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(dtype=torch.float64), TypeError),
        (dict(dtype=torch.int32), TypeError),
        (dict(q_len=0), ValueError),
        (dict(kv_heads=3), ValueError),
    ],
)
def test_bad_input_is_rejected(change, error):
    dtype = change.get("dtype", torch.float32)
    q_len, kv_heads = change.get("q_len", 4), change.get("kv_heads", 2)
    q = torch.ones(1, 4, q_len, 8).to(dtype)
    k = torch.ones(1, kv_heads, 4, 8).to(dtype)
    slots = torch.arange(4).expand(1, -1)
    with pytest.raises(error):
        ops.sparse_attention(q, k, k, Visibility(torch.zeros(1, dtype=torch.long),
                                                 streaming=torch.zeros(kv_heads, dtype=torch.bool), sink=1, local=2,
                                                 q_first=0, k_pos=slots), LogitTerms(1.0))
