"""The decode step read through Transformers' block table (continuous batching's decode fast path): the Triton
kernel (under the interpreter on the CPU, natively on a GPU) against its reference, and the reference against the
rule written out by hand in float64."""

import pytest
import torch
from conftest import DEVICE

from sparse_attn_hf import ops
from sparse_attn_hf.kernels.layout import LogitTerms
from sparse_attn_hf.kernels.reference import block_table_decode_reference


def _case(lengths, page, hq, hkv, dim, dtype, seed, spare_pages=3):
    """Requests of ``lengths`` (0: the manager's padding) with their pages scattered over a shared pool in a random
    order, unused table entries -1; the new token's slot in the pages holds garbage."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // page) for n in lengths]
    pool = sum(need) + spare_pages
    order = torch.randperm(pool, generator=gen).tolist()
    width = max(need + [1]) + 1
    table = torch.full((len(lengths), width), -1, dtype=torch.int32)
    for r, n in enumerate(need):
        table[r, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    k_pages = torch.randn(pool, page, hkv, dim, generator=gen).to(dtype)
    v_pages = torch.randn(pool, page, hkv, dim, generator=gen).to(dtype)
    query = torch.randn(len(lengths), hq, dim, generator=gen).to(dtype)
    key = torch.randn(len(lengths), hkv, dim, generator=gen).to(dtype)
    value = torch.randn(len(lengths), hkv, dim, generator=gen).to(dtype)
    cu_k = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    kind = (torch.rand(hkv, generator=gen) < 0.5).to(torch.int32)
    kind[0], kind[-1] = 0, 1  # both kinds in every case
    return [x.to(DEVICE) for x in (query, key, value, k_pages, v_pages, table, cu_k, kind)]


# lengths (0: padding), page size, query heads, KV heads, head dim, sink, window
CASES = [
    ([1, 5, 40, 0, 130], 16, 8, 2, 64, 4, 16),
    ([300, 7, 0, 0], 256, 4, 4, 128, 8, 64),  # the manager's default page; one request shorter than the window
    ([33, 64, 65, 2], 7, 6, 3, 80, 3, 10),  # an odd page, head_dim 80, 2 query heads per KV head
    ([500, 1], 32, 32, 8, 64, 0, 32),  # no sink, Llama's group of 4
]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_block_table_kernel_matches_reference(case, dtype):
    lengths, page, hq, hkv, dim, sink, window = case
    args = _case(lengths, page, hq, hkv, dim, dtype, seed=len(lengths) * page + dim)
    pages_before = [x.clone() for x in args[3:5]]
    expected_pages = [x.clone() for x in args[3:5]]
    terms = LogitTerms(dim ** -0.5)
    expected = block_table_decode_reference(*args[:3], *expected_pages, *args[5:], sink=sink, window=window,
                                            terms=terms)
    try:
        ops.set_backend("triton")
        got = ops.block_table_decode(*args, sink=sink, window=window, terms=terms)
    finally:
        ops.set_backend("auto")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    for got_pages, want, before in zip(args[3:5], expected_pages, pages_before):
        assert torch.equal(got_pages, want), "the new token must land in its page, and nothing else change"
        assert not torch.equal(got_pages, before)
    padded = [r for r, n in enumerate(lengths) if n == 0]
    assert not got[padded].any(), "a padding row gives zeros"


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_cpu_sdpa_path_matches_reference(case, dtype):
    """The CPU's implementation (SDPA over the gathered tokens, what ``ops.block_table_decode`` runs there) against
    the reference: the same output and the same pages written."""
    from sparse_attn_hf.kernels.decode_sdpa import block_table_decode_sdpa

    lengths, page, hq, hkv, dim, sink, window = case
    query, key, value, k_pages, v_pages, table, cu_k, kind = (x.cpu() for x in _case(
        lengths, page, hq, hkv, dim, dtype, seed=len(lengths) * page + dim))
    want_k, want_v = k_pages.clone(), v_pages.clone()
    expected = block_table_decode_reference(query, key, value, want_k, want_v, table, cu_k, kind, sink=sink,
                                            window=window, terms=LogitTerms(dim ** -0.5))
    got = block_table_decode_sdpa(query, key, value, k_pages, v_pages, table, cu_k, kind, sink=sink, window=window,
                                  scale=dim ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    assert torch.equal(k_pages, want_k) and torch.equal(v_pages, want_v)


@torch.no_grad()
def test_block_table_kernel_with_softcap_and_learned_sinks():
    args = _case([70, 3, 129], 16, 8, 2, 64, torch.float32, seed=9)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    terms = LogitTerms(0.125, softcap=5.0, sinks=sinks)
    expected = block_table_decode_reference(*args[:3], *[x.clone() for x in args[3:5]], *args[5:], sink=4,
                                            window=16, terms=terms)
    try:
        ops.set_backend("triton")
        got = ops.block_table_decode(*args, sink=4, window=16, terms=terms)
    finally:
        ops.set_backend("auto")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    plain = block_table_decode_reference(*args[:3], *[x.clone() for x in args[3:5]], *args[5:], sink=4, window=16,
                                         terms=LogitTerms(0.125))
    assert not torch.allclose(got, plain, atol=1e-3), "the terms must change the answer"


@torch.no_grad()
def test_block_table_reference_is_the_rule():
    """The reference against the rule by hand (float64): dense heads see every token of their request, streaming
    heads the first min(sink, n - window) and the last window; the new token is read after it is written."""
    lengths, page, sink, window = [23, 9, 1], 4, 3, 6
    query, key, value, k_pages, v_pages, table, cu_k, kind = (x.cpu() for x in _case(lengths, page, 4, 2, 8,
                                                                                     torch.float64, seed=4))
    out = block_table_decode_reference(query, key, value, k_pages, v_pages, table, cu_k, kind, sink=sink,
                                       window=window, terms=LogitTerms(0.5))
    for r, n in enumerate(lengths):
        tokens = [(int(table[r, i // page]), i % page) for i in range(n)]
        assert torch.equal(k_pages[tokens[-1]], key[r]) and torch.equal(v_pages[tokens[-1]], value[r])
        keys = torch.stack([k_pages[t] for t in tokens])  # [n, Hkv, D]
        values = torch.stack([v_pages[t] for t in tokens])
        for head in range(4):
            kv_head = head // 2
            seen = [i for i in range(n) if kind[kv_head] == 0 or i >= n - window or i < min(sink, max(n - window, 0))]
            probs = torch.softmax(keys[seen, kv_head] @ query[r, head] * 0.5, 0)
            torch.testing.assert_close(out[r, head], probs @ values[seen, kv_head], rtol=1e-6, atol=1e-6)  # fp32 inside
    assert kind.tolist().count(1) and lengths[0] > sink + window  # the case exercises the streaming rule


def test_block_table_decode_names_a_shape_error():
    args = _case([5], 4, 4, 2, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"new keys/values \[R, 2, D\]"):
        ops.block_table_decode(args[0], args[1][:, :1], args[2][:, :1], *args[3:], sink=1, window=2,
                               terms=LogitTerms(1.0))
