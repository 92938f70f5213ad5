"""The decode step read through Transformers' block table (continuous batching's decode fast path): the Triton
kernel (under the interpreter on the CPU, natively on a GPU) against its reference, and the reference against the
rule written out by hand in float64; with and without a page selection for the dense heads."""

import pytest
import torch
from conftest import DEVICE

from sparse_attn_hf import ops
from sparse_attn_hf.kernels.layout import BlockTableSelection, LogitTerms
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


def _selection(tails, hkv, slots, page_size, seed, every=False, device=DEVICE):
    """Each request's ``tails`` (-1: no selection) and, per KV head, up to ``slots`` distinct pages before its tail
    in a random order, -1 in the other slots (``every``: all of them, ``slots`` then at least the largest tail)."""
    gen = torch.Generator().manual_seed(seed)
    pages = torch.full((len(tails), hkv, slots), -1, dtype=torch.int32)
    for r, tail in enumerate(tails):
        before = max(tail, 0)  # pages before the tail
        for h in range(hkv):
            count = before if every else int(torch.randint(0, min(slots, before) + 1, (1,), generator=gen))
            listed = torch.randperm(before, generator=gen)[:count]
            pages[r, h, torch.randperm(slots, generator=gen)[:count]] = listed.to(torch.int32)
    return BlockTableSelection(pages.to(device), torch.tensor(tails, dtype=torch.int32, device=device), page_size)


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
    _kernel_against_reference(args, lengths, dtype, sink, window)


def _kernel_against_reference(args, lengths, dtype, sink, window, selection=None):
    """The Triton kernel on ``_case``'s ``args`` against the reference: the same output, the new token written into
    its page and nothing else changed, zeros for padding rows."""
    pages_before = [x.clone() for x in args[3:5]]
    expected_pages = [x.clone() for x in args[3:5]]
    terms = LogitTerms(args[0].shape[-1] ** -0.5)
    expected = block_table_decode_reference(*args[:3], *expected_pages, *args[5:], sink=sink, window=window,
                                            terms=terms, selection=selection)
    try:
        ops.set_backend("triton")
        got = ops.block_table_decode(*args, sink=sink, window=window, terms=terms, selection=selection)
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


@torch.no_grad()
def test_block_table_reference_with_selection_is_the_rule():
    """The reference against the rule by hand (float64): a selecting request's dense heads see the positions of
    their listed pages and every position from ``tail_first * page_size``; streaming heads and the other requests as
    without a selection."""
    lengths, page, sink, window, size, tails = [70, 9, 0, 40], 4, 3, 6, 16, [3, -1, 0, 1]
    query, key, value, k_pages, v_pages, table, cu_k, kind = (x.cpu() for x in _case(lengths, page, 4, 2, 8,
                                                                                     torch.float64, seed=5))
    selection = _selection(tails, 2, 2, size, seed=6, device="cpu")
    out = block_table_decode_reference(query, key, value, k_pages, v_pages, table, cu_k, kind, sink=sink,
                                       window=window, terms=LogitTerms(0.5), selection=selection)
    for r, n in enumerate(lengths):
        if n == 0:
            assert not out[r].any(), "a padding row gives zeros"
            continue
        tokens = [(int(table[r, i // page]), i % page) for i in range(n)]
        keys = torch.stack([k_pages[t] for t in tokens])  # [n, Hkv, D]
        values = torch.stack([v_pages[t] for t in tokens])
        for head in range(4):
            kv_head = head // 2
            listed = set(selection.pages[r, kv_head].tolist())
            if kind[kv_head] == 1:
                seen = [i for i in range(n) if i >= n - window or i < min(sink, max(n - window, 0))]
            else:
                seen = [i for i in range(n) if tails[r] < 0 or i // size in listed or i >= tails[r] * size]
            probs = torch.softmax(keys[seen, kv_head] @ query[r, head] * 0.5, 0)
            torch.testing.assert_close(out[r, head], probs @ values[seen, kv_head], rtol=1e-6, atol=1e-6)
    counts = (selection.pages >= 0).sum(-1)  # [R, Hkv]
    assert any(0 < counts[r, h] < tails[r] for r in (0, 3) for h in range(2) if kind[h] == 0), "a page left out"


# lengths (0: padding), pool page size, query heads, KV heads, head dim, sink, window, selection page size, each
# request's tail_first (-1: no selection), selection slots per head
SELECTION_CASES = [
    ([1, 130, 0, 75], 7, 8, 4, 80, 4, 16, 16, [-1, 6, 0, 3], 3),
    ([200, 90, 33], 16, 4, 4, 64, 0, 32, 64, [2, -1, 0], 2),
    ([300, 129, 5], 256, 12, 3, 80, 8, 64, 64, [4, 2, -1], 4),  # request 1's tail: the new token alone
    ([64, 48], 16, 6, 2, 32, 2, 8, 16, [3, 1], 3),
    ([90, 40], 1, 4, 2, 64, 2, 8, 16, [4, -1], 2),  # pages of one token: a read-back row (packed_decode_rows)
]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SELECTION_CASES, ids=[f"case{i}" for i in range(len(SELECTION_CASES))])
def test_block_table_kernel_with_selection_matches_reference(case, dtype):
    lengths, page, hq, hkv, dim, sink, window, size, tails, slots = case
    args = _case(lengths, page, hq, hkv, dim, dtype, seed=len(lengths) * page + dim)
    selection = _selection(tails, hkv, slots, size, seed=page + size)
    _kernel_against_reference(args, lengths, dtype, sink, window, selection)
    assert (selection.pages == -1).any() and (selection.pages >= 0).any()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_sdpa_path_with_selection_matches_reference(dtype):
    """``ops.block_table_decode`` on the CPU (backend "auto": SDPA over the gathered tokens) with a selection
    against the reference: the same output and the same pages written."""
    lengths, page, hq, hkv, dim, sink, window, size, tails, slots = SELECTION_CASES[0]
    query, key, value, k_pages, v_pages, table, cu_k, kind = (x.cpu() for x in _case(
        lengths, page, hq, hkv, dim, dtype, seed=3))
    selection = _selection(tails, hkv, slots, size, seed=4, device="cpu")
    want_k, want_v = k_pages.clone(), v_pages.clone()
    terms = LogitTerms(dim ** -0.5)
    expected = block_table_decode_reference(query, key, value, want_k, want_v, table, cu_k, kind, sink=sink,
                                            window=window, terms=terms, selection=selection)
    got = ops.block_table_decode(query, key, value, k_pages, v_pages, table, cu_k, kind, sink=sink, window=window,
                                 terms=terms, selection=selection)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    assert torch.equal(k_pages, want_k) and torch.equal(v_pages, want_v)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_selecting_every_page_is_no_selection(backend):
    """Every page before the tail listed (in a random order, -1 slots between): the output without a selection;
    one page left out of a dense head: another output."""
    lengths, page, size, tails = [150, 70, 0, 20], 16, 16, [7, 3, 0, -1]
    args = _case(lengths, page, 8, 2, 32, torch.float32, seed=11)
    if backend == "auto":  # the CPU's SDPA path
        args = [x.cpu() for x in args]
    every = _selection(tails, 2, 9, size, seed=12, every=True, device=args[0].device)
    dropped = every.pages.clone()
    dropped[0, 0][dropped[0, 0] == 3] = -1  # KV head 0 is dense (``_case``)
    terms = LogitTerms(32 ** -0.5)
    expected = block_table_decode_reference(*args[:3], *[x.clone() for x in args[3:5]], *args[5:], sink=2,
                                            window=8, terms=terms)
    try:
        ops.set_backend(backend)
        outs = [ops.block_table_decode(*args[:3], *[x.clone() for x in args[3:5]], *args[5:], sink=2, window=8,
                                       terms=terms, selection=s)
                for s in (every, BlockTableSelection(dropped, every.tail_first, size))]
    finally:
        ops.set_backend("auto")
    torch.testing.assert_close(outs[0], expected, rtol=1e-4, atol=1e-4)
    changed = (outs[1] - expected).abs().amax(-1) > 1e-3  # [R, Hq]: KV head 0's query heads are 0..3
    assert changed[0, :4].all() and not changed[0, 4:].any() and not changed[1:].any()


def test_block_table_decode_names_a_selection_shape_error():
    args = _case([5], 4, 4, 2, 8, torch.float32, seed=1)
    tail_first = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    wrong = BlockTableSelection(torch.full((1, 3, 2), -1, dtype=torch.int32, device=DEVICE), tail_first, 16)
    with pytest.raises(ValueError, match=r"pages \[1, 2, S\] and tail_first \[1\]"):
        ops.block_table_decode(*args, sink=1, window=2, terms=LogitTerms(1.0), selection=wrong)
    odd = BlockTableSelection(torch.full((1, 2, 2), -1, dtype=torch.int32, device=DEVICE), tail_first, 24)
    with pytest.raises(ValueError, match="multiple of 16, got 24"):
        ops.block_table_decode(*args, sink=1, window=2, terms=LogitTerms(1.0), selection=odd)
