"""Dense heads run the best dense kernel at hand (ops.dense_attention: PyTorch SDPA without padding, the Triton
kernel or a masked SDPA with it); every route computes the reference's rule."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_by_rule, loop_mask, masked_sdpa

from sparse_attn_hf import ops
from sparse_attn_hf.ops import LogitTerms

pytestmark = pytest.mark.compat  # also run on the oldest supported Transformers (.ci/run)

# batch, q heads, kv heads, q_len, k_len, head_dim, pads
CASES = [
    (1, 4, 4, 37, 37, 64, [0]),  # GQA 1, one shot
    (2, 6, 2, 29, 45, 64, [0, 0]),  # GQA 3, a chunk against a cache (bottom-right causality)
    (1, 8, 2, 1, 70, 128, [0]),  # one query token
    (2, 8, 2, 40, 40, 128, [5, 0]),  # left padding
    (3, 4, 1, 17, 33, 32, [0, 32, 3]),  # padding, a chunk, a row with one real token
]


@pytest.mark.parametrize("shapes_vary", [False, True], ids=["fixed_shapes", "shapes_vary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_dense_route_matches_the_rule(case, dtype, shapes_vary):
    batch, heads, kv_heads, q_len, k_len, head_dim, pads = case
    gen = torch.Generator().manual_seed(CASES.index(case) + 7 * (dtype == torch.bfloat16))
    q, k, v = (torch.randn(batch, h, n, head_dim, generator=gen, dtype=torch.float64)
               for h, n in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len)))
    kv_start = torch.tensor(pads)
    got = ops.dense_attention(q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), LogitTerms(head_dim**-0.5),
                              kv_start=kv_start.to(DEVICE), padded=any(pads), shapes_vary=shapes_vary)
    assert got.shape == (batch, q_len, heads, head_dim)
    slots = torch.arange(k_len).expand(batch, -1)
    mask = loop_mask(slots[:, k_len - q_len :], slots, kv_start, torch.zeros(kv_heads, dtype=torch.bool), 0, 1)
    golden = masked_sdpa(q, k, v, mask, head_dim**-0.5)
    baseline = masked_sdpa(q.to(dtype), k.to(dtype), v.to(dtype), mask, head_dim**-0.5)
    real = (slots[:, k_len - q_len :] >= kv_start[:, None])  # rows of pads: zeros (checked below)
    assert_close_by_rule(got.cpu()[real], golden[real], baseline[real])
    assert (got.cpu()[~real] == 0).all()


def test_cudnn_only_where_its_plans_pay():
    """cuDNN's per-shape plans cost milliseconds of host time: never for one query or for calls whose shapes vary
    (continuous batching), and its absence changes nothing on a CPU."""
    from sparse_attn_hf.ops.dense import plans_pay

    assert plans_pay(True, 4096, False)
    assert not plans_pay(True, 1, False)
    assert not plans_pay(True, 4096, True)
    assert plans_pay(False, 1, True)


def test_sdpa_without_cudnn_is_sdpa():
    from sparse_attn_hf.ops.dense import _sdpa_without_cudnn

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 16, generator=gen) for h, n in ((4, 1), (2, 37), (2, 37)))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.testing.assert_close(_sdpa_without_cudnn(q, k, v, enable_gqa=True), sdpa(q, k, v, enable_gqa=True))


def _math_attention_with_lse(query, key, value, causal, scale):
    """Plain attention returning (out, natural-log LSE [B, H, Lq]), as the cuDNN op does (GQA included)."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scores = (query.double() @ key.double().transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return ((scores - lse[..., None]).exp() @ value.double()).to(query.dtype), lse.float()


@pytest.mark.parametrize("q_len, k_len", [(5, 23), (16, 17), (31, 300)])
def test_split_causal_attention_merges_to_bottom_right_causal(q_len, k_len):
    """Chunks on CUDA run cuDNN twice (earlier keys, the chunk's own square) merged by log-sum-exp: the merge
    must equal bottom-right causal attention."""
    gen = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, 6, q_len, 32, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, k_len, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    got = ops.split_causal_attention(_math_attention_with_lse, q.float(), k.float(), v.float(), 32**-0.5)
    slots = torch.arange(k_len).expand(2, -1)
    mask = loop_mask(slots[:, k_len - q_len :], slots, torch.zeros(2, dtype=torch.long),
                     torch.zeros(2, dtype=torch.bool), 0, 1)
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.transpose(1, 2).double(), masked_sdpa(q, k, v, mask, 32**-0.5), rtol=1e-5,
                               atol=1e-5)


def test_dense_route_rejects_more_queries_than_keys():
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="Lq <= Lk"):
        ops.dense_attention(q, k, k, LogitTerms(0.25), kv_start=torch.zeros(1, dtype=torch.long), padded=False)


# batch, q heads, kv heads, q_len, k_len, head_dim, pads, sink, local, tile
WINDOW_CASES = [
    (1, 4, 4, 37, 37, 64, [0], 4, 8, 16),  # GQA 1, Lq not a tile multiple
    (2, 6, 2, 29, 45, 32, [0, 5], 3, 7, 8),  # GQA 3, a chunk after cached keys, left padding
    (3, 4, 1, 33, 33, 16, [0, 32, 3], 0, 5, 16),  # no sink, a row with one real token
    (1, 2, 1, 50, 50, 80, [0], 64, 64, 256),  # window and sink cover everything, one tile
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=[f"case{i}" for i in range(len(WINDOW_CASES))])
def test_cpu_window_tiles_match_the_rule(case, dtype):
    """The CPU path of streaming heads (one SDPA call over window tiles) against the loop-built mask."""
    from sparse_attn_hf.kernels.window_sdpa import streaming_attention_sdpa

    batch, heads, kv_heads, q_len, k_len, head_dim, pads, sink, local, tile = case
    gen = torch.Generator().manual_seed(50 + WINDOW_CASES.index(case))
    q, k, v = (torch.randn(batch, h, n, head_dim, generator=gen, dtype=torch.float64)
               for h, n in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len)))
    kv_start = torch.tensor(pads)
    got = streaming_attention_sdpa(q.to(dtype), k.to(dtype), v.to(dtype), q_first=k_len - q_len, kv_start=kv_start,
                                   sink=sink, local=local, scale=head_dim**-0.5, tile=tile)
    slots = torch.arange(k_len).expand(batch, -1)
    mask = loop_mask(slots[:, k_len - q_len :], slots, kv_start, torch.ones(kv_heads, dtype=torch.bool), sink, local)
    golden = masked_sdpa(q, k, v, mask, head_dim**-0.5)
    baseline = masked_sdpa(q.to(dtype), k.to(dtype), v.to(dtype), mask, head_dim**-0.5)
    assert_close_by_rule(got, golden, baseline)
