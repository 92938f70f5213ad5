"""Sparse decoding: page selection, the decode kernel against its reference, and generate() end to end."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_by_rule, left_padded, random_ids, tiny_model

from sparse_attn_hf import Profile, SparseCache, SparseConfig, last_call, ops, patch_model, unpatch_model
from sparse_attn_hf.kernels.decode import paged_decode_triton
from sparse_attn_hf.kernels.layout import (
    STEP_DUE,
    STEP_RESELECT,
    STEP_SEEN,
    STEP_TAIL,
    DecodeKV,
    LogitTerms,
    Visibility,
    step_counters,
    reset_step,
)
from sparse_attn_hf.kernels.reference import (
    page_scores,
    paged_decode_reference,
    physical_page_scores_reference,
    shortlist_page_scores_reference,
    shortlist_pages_reference,
    top_pages_reference,
)
from sparse_attn_hf.kernels.selection import physical_page_scores_triton, shortlist_pages_triton, top_pages_triton
from sparse_attn_hf.methods.decode_step import DecodePlan
from sparse_attn_hf.methods.page_selection import PageSettings, plan_step, select_pages
from sparse_attn_hf.cache import SparseLayer
from sparse_attn_hf.compat import CACHE_ARG, cache_of

pytestmark = pytest.mark.compat  # also run on the oldest supported Transformers (.ci/run)


# ------------------------------------------------------------------ selection
def _stats(keys: torch.Tensor, logical: int, kv_start: torch.Tensor):
    """Logical-page min/max of real keys, +inf/-inf where a page has none (as SparseCache keeps them)."""
    batch, heads, length, dim = keys.shape
    real = (torch.arange(length)[None, :] >= kv_start[:, None])[:, None, :, None]
    kmin = torch.where(real, keys, float("inf")).view(batch, heads, length // logical, logical, dim).amin(3)
    kmax = torch.where(real, keys, float("-inf")).view(batch, heads, length // logical, logical, dim).amax(3)
    return kmin, kmax


def test_page_score_bounds_every_key_and_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 32, generator=gen)
    keys = torch.randn(2, 3, 128, 32, generator=gen)
    kmin, kmax = _stats(keys, 16, torch.zeros(2, dtype=torch.long))
    scores = page_scores(q, kmin, kmax)
    direct = torch.maximum(q[:, :, :, None] * kmax[:, :, None], q[:, :, :, None] * kmin[:, :, None]).sum(-1)
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-4)
    exact = torch.einsum("bhgd,bhnd->bhgn", q, keys).view(2, 3, 4, 8, 16).amax(-1)
    assert (exact <= scores + 1e-4).all(), "a page score must bound q.k of every key in the page"


@pytest.mark.parametrize("pads", [[0, 0], [0, 150]])
def test_selection_keeps_sink_and_best_pages(pads):
    gen = torch.Generator().manual_seed(1)
    batch, heads, groups, dim, seen, page, logical, budget = 2, 2, 3, 16, 1000, 64, 16, 256
    kv_start = torch.tensor(pads)
    keys = torch.randn(batch, heads, 1024, dim, generator=gen)
    keys[:, :, seen:] = 0
    q = torch.randn(batch, heads, groups, dim, generator=gen)
    kmin, kmax = _stats(keys, logical, kv_start)
    kmin[:, :, seen // logical + 1 :], kmax[:, :, seen // logical + 1 :] = float("inf"), float("-inf")
    step = step_counters(seen)
    step[STEP_RESELECT] = 1
    scores = torch.full((batch, heads, 1024 // page), float("nan"))  # every entry is written on a reselecting step
    pages = select_pages(q, dict(key_min=kmin, key_max=kmax, scores=scores), step, Visibility(kv_start),
                         LogitTerms(1.0), PageSettings(budget, page, logical))
    tail_first = (seen - 1) // page
    assert pages.shape == (batch, heads, budget // page - 1) and not scores.isnan().any()
    # brute force: score every candidate page from the keys themselves
    per_page = torch.maximum(q[..., None, :] * kmax[:, :, None], q[..., None, :] * kmin[:, :, None]).sum(-1)
    per_page = per_page.amax(2)[..., : tail_first * 4].view(batch, heads, tail_first, 4).amax(-1)
    for b in range(batch):
        first = pads[b] // page
        for h in range(heads):
            chosen = set(pages[b, h].tolist())
            assert first in chosen and tail_first not in chosen
            candidates = per_page[b, h].clone()
            candidates[: first + 1] = float("-inf")  # before the first real page: padding only
            best = set(torch.topk(candidates, len(chosen) - 1).indices.tolist())
            assert chosen - {first} == best


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 4, 64, 64, 16, [0, 300]), (1, 2, 1, 128, 32, 16, [0]),
                                   (2, 1, 3, 80, 64, 32, [5, 0])], ids=["gqa4", "gqa1", "d80"])
def test_selection_kernel_matches_reference(shape, dtype):
    batch, heads, groups, dim, page, logical, pads = shape
    gen = torch.Generator().manual_seed(dim + groups)
    kv_start = torch.tensor(pads)
    keys = torch.randn(batch, heads, 2048, dim, generator=gen).to(dtype)
    kmin, kmax = _stats(keys.float(), logical, kv_start)
    kmin, kmax = kmin.to(dtype).to(DEVICE), kmax.to(dtype).to(DEVICE)
    q = torch.randn(batch, heads, groups, dim, generator=gen).to(dtype).to(DEVICE)
    common = dict(kv_start=kv_start.to(DEVICE), page_size=page, logical_page_size=logical)
    seen, width = (2048 // page - 2) * page - 5, 2048 // page  # candidates: the pages before the newest
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    out = torch.full((batch, heads, width), float("nan"), device=DEVICE)
    got = physical_page_scores_triton(q, kmin, kmax, seen=one * seen, out=out, reselect=one, **common)
    expected = physical_page_scores_reference(q, kmin, kmax, seen=seen, width=width, **common)
    assert torch.equal(torch.isinf(got), torch.isinf(expected)) and not got.isnan().any()
    assert (expected[..., -(seen // -page) - 1 :] == float("-inf")).all()  # the tail and past it: no candidate
    kept = got.clone()
    physical_page_scores_triton(q * 3, kmin, kmax, seen=one * seen, out=out, reselect=one * 0, **common)
    assert torch.equal(out, kept), "a step that reuses its selection leaves the scores as they are"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-3 * dim ** 0.5)
    k = 8
    same = torch.topk(got, k).indices.sort().values == torch.topk(expected, k).indices.sort().values
    assert same.float().mean() > 0.95  # the same pages, up to near ties of rounding


def _shortlist_case(batch, heads, groups, dim, page, pads, *, seed, dtype=torch.float32, length=1024):
    """Random keys, queries, stage-1 scores and a short list of 2 x 3 pages per (row, KV head)."""
    gen = torch.Generator().manual_seed(seed)
    kv_start = torch.tensor(pads)
    keys = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    q = (torch.randn(batch, heads, groups, dim, generator=gen) * 2).to(dtype)
    seen = length - page - 7  # the newest page is partly written
    kmin, kmax = _stats(keys.float(), 16, kv_start)
    width = length // page
    bound = physical_page_scores_reference(q, kmin, kmax, kv_start=kv_start, seen=seen, width=width, page_size=page,
                                           logical_page_size=16)
    listed = torch.topk(bound, 6, dim=-1, sorted=False).indices
    return q, keys, bound, listed, kv_start, seen


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_shortlist_scores_are_the_exact_mass_of_the_listed_pages(softcap):
    """Stage 2 against a brute force: per query head, a softmax over the listed pages' real keys; a page scores
    its share summed over the group; the sink page keeps +inf and every other page -inf."""
    batch, heads, groups, dim, page = 2, 2, 3, 16, 32
    q, keys, bound, listed, kv_start, seen = _shortlist_case(batch, heads, groups, dim, page, [0, 70], seed=2)
    scale = dim ** -0.5
    got = shortlist_page_scores_reference(q, keys, bound, listed, kv_start=kv_start, seen=seen, page_size=page,
                                          scale=scale, softcap=softcap)
    for b in range(batch):
        for h in range(heads):
            pages = [p for p in listed[b, h].tolist() if bound[b, h, p] > float("-inf")]
            slots = [s for p in pages for s in range(p * page, (p + 1) * page) if kv_start[b] <= s < seen]
            logits = q[b, h] @ keys[b, h, slots].T * scale
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            probs = torch.softmax(logits, -1).sum(0)
            expected = torch.full((bound.shape[2],), float("-inf"))
            for p in pages:
                inside = torch.tensor([p * page <= s < (p + 1) * page for s in slots])
                expected[p] = float("inf") if bound[b, h, p] == float("inf") else probs[inside].sum()
            assert expected[kv_start[b] // page] == float("inf")  # the sink page is listed and kept
            torch.testing.assert_close(got[b, h], expected, rtol=1e-5, atol=1e-6)


def test_top_pages_compiles_a_few_variants_for_every_context_length():
    """The top-k kernel's block follows the row's width in a few buckets, not in every power of two: a model's
    warm-up compiles them all (``compile_top_pages``), and no later prompt length compiles another."""
    from sparse_attn_hf.kernels.selection import ROW_BLOCKS, _block

    variants = {_block(width)[:2] for width in range(1, 40000)}
    assert len(variants) == len(ROW_BLOCKS) + 1  # one per bucket, and the looping one past the last
    assert all(_block(width)[0] >= width for width in range(1, ROW_BLOCKS[-1] + 1))


@pytest.mark.parametrize("width,k,block", [(50, 7, None), (50, 60, None), (3000, 63, None), (3000, 63, 1024),
                                           (20, 0, None), (257, 31, None)],
                         ids=["short", "k-over-width", "long", "blocks", "k0", "bucket-edge"])
def test_top_pages_kernel_matches_torch_topk(width, k, block, monkeypatch):
    """The bisection top-k against torch.topk: random scores with -inf holes, +inf entries and ties (which may
    be broken either way: compared as the multiset of values chosen), rows with fewer real entries than k; a
    reusing step leaves the selection; rows longer than a register block (``block``) take the looping path."""
    import sparse_attn_hf.kernels.selection as selection

    if block is not None:
        monkeypatch.setattr(selection, "ROW_BLOCKS", (block // 2,))
    gen = torch.Generator().manual_seed(width + k)
    scores = torch.randn(3, 2, width, generator=gen).round(decimals=1)  # ties
    scores[scores < -1.2] = float("-inf")
    scores[0, 0, :3] = float("inf")
    scores[1, 1, : width - 3] = float("-inf")  # 3 real entries only
    scores[2, 0] = -scores[2, 0].abs() - 0.5  # all negative: the bit order of negative floats
    scores = scores.to(DEVICE)
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    out = torch.full((3, 2, k), 99, dtype=torch.int32, device=DEVICE)
    got = top_pages_triton(scores, out=out, reselect=one)
    expected = top_pages_reference(scores, k)
    assert got.shape == expected.shape
    values = lambda pages: torch.where(pages >= 0, scores.gather(2, pages.long().clamp(min=0)),  # noqa: E731
                                       torch.tensor(float("nan"), device=DEVICE)).sort(-1).values
    torch.testing.assert_close(values(got), values(expected), equal_nan=True)
    for row in got.flatten(0, 1).tolist():  # no page twice
        real = [p for p in row if p >= 0]
        assert len(real) == len(set(real))
    kept = got.clone()
    top_pages_triton(-scores, out=out, reselect=one * 0)
    assert torch.equal(out, kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 4, 64, 64, [0, 300], None), (1, 2, 1, 128, 32, [0], None),
                                   (2, 1, 3, 80, 16, [5, 0], 3.0)], ids=["gqa4", "gqa1", "d80-softcap"])
def test_shortlist_kernel_matches_reference(shape, dtype):
    """Stage 2's kernel against its reference: the same masses (checked through the chosen pages' masses, as
    near-ties may be broken either way), -1 entries in the short list, and a reusing step leaves the choice."""
    batch, heads, groups, dim, page, pads, softcap = shape
    q, keys, bound, listed, kv_start, seen = _shortlist_case(batch, heads, groups, dim, page, pads, seed=dim,
                                                             dtype=dtype)
    listed[..., -1] = -1  # a short list with fewer pages than places
    common = dict(kv_start=kv_start.to(DEVICE), page_size=page, scale=dim ** -0.5, softcap=softcap)
    q, keys, bound, listed = q.to(DEVICE), keys.to(DEVICE), bound.to(DEVICE), listed.to(DEVICE).int()
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    out = torch.full((batch, heads, 3), 99, dtype=torch.int32, device=DEVICE)
    got = shortlist_pages_triton(q, keys, bound, listed, seen=one * seen, out=out, reselect=one, **common)
    expected = shortlist_pages_reference(q, keys, bound, listed, seen=seen, k=3, **common)
    mass = shortlist_page_scores_reference(q, keys, bound, listed, seen=seen, **common)
    chosen = lambda pages: mass.gather(2, pages.long().clamp(min=0)).sort(-1).values  # noqa: E731
    assert torch.equal(torch.isinf(chosen(got)), torch.isinf(chosen(expected)))
    tol = dict(rtol=2e-2, atol=2e-3) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chosen(got).nan_to_num(posinf=9), chosen(expected).nan_to_num(posinf=9), **tol)
    assert ((got >= 0) == (expected >= 0)).all()
    kept = got.clone()
    shortlist_pages_triton(q * 3, keys, bound, listed, seen=one * seen, out=out, reselect=one * 0, **common)
    assert torch.equal(out, kept), "a step that reuses its selection leaves the pages as they are"


def test_two_stage_selection_reads_the_short_list_by_exact_mass():
    """select_pages with a short list: the pages of highest exact mass among those the bound lists (here 2 x 3 of
    them), the sink page always; a list as long as the context gives the oracle's choice; a reusing step
    returns the stored choice."""
    from sparse_attn_hf.eval import page_oracle

    batch, heads, groups, dim, page = 2, 2, 3, 16, 32
    q, keys, bound, listed, kv_start, seen = _shortlist_case(batch, heads, groups, dim, page, [0, 70], seed=4)
    kmin, kmax = _stats(keys, 16, kv_start)
    step = step_counters(seen)
    step[STEP_RESELECT] = 1
    scores = torch.full_like(bound, float("nan"))
    selected = torch.full((batch, heads, 3), 99, dtype=torch.int32)
    common = (Visibility(kv_start), LogitTerms(dim ** -0.5))
    store = dict(key_min=kmin, key_max=kmax, scores=scores, keys=keys)
    pages = select_pages(q, dict(store, selected=selected), step, *common,
                         PageSettings(4 * page, page, 16, shortlist=2))
    assert pages is selected
    torch.testing.assert_close(scores, bound)
    mass = shortlist_page_scores_reference(q, keys, bound, listed, kv_start=kv_start, seen=seen, page_size=page,
                                           scale=dim ** -0.5)
    expected = torch.topk(mass, 3, dim=-1).indices
    assert torch.equal(pages.sort(-1).values, expected.to(torch.int32).sort(-1).values)
    chosen = pages.clone()
    step[STEP_RESELECT] = 0
    again = select_pages(q * -1, dict(store, selected=selected), step, *common,
                         PageSettings(4 * page, page, 16, shortlist=2))
    assert torch.equal(again, chosen)
    step[STEP_RESELECT] = 1
    every = select_pages(q, store, step, *common, PageSettings(4 * page, page, 16, shortlist=100))
    true_mass = page_oracle.page_mass(q, keys, kv_start=kv_start, seen=seen, page_size=page, scale=dim ** -0.5)
    oracle, _ = page_oracle.oracle_pages(true_mass, kv_start=kv_start, budget=4 * page, page_size=page)
    assert torch.equal(every.sort(-1).values, oracle.sort(-1).values)


def test_selection_when_the_context_fits_or_is_mostly_padding():
    q = torch.randn(1, 1, 1, 8)
    start = torch.tensor([200])  # only pages 3 (partly) and the tail hold real tokens
    kmin, kmax = _stats(torch.randn(1, 1, 320, 8), 16, start)
    step = step_counters(320)
    step[STEP_RESELECT] = 1
    pages = select_pages(q, dict(key_min=kmin, key_max=kmax, scores=torch.empty(1, 1, 5)), step, Visibility(start),
                         LogitTerms(1.0), PageSettings(256, 64, 16))
    assert sorted(pages.flatten().tolist()) == [-1, -1, 3]


def test_step_plan_selects_when_the_context_outgrows_the_budget_then_every_reuse_interval():
    """The device counters: the tail is everything while the context fits, then the newest page of the last
    selection, which a reuse keeps even when a new page starts (the page before it stays attended)."""
    step = torch.zeros(4, dtype=torch.int32)
    reset_step(step, 250)  # a 250-token prompt; pages of 64, a budget of 4 pages (256 tokens)
    seen = []
    for _ in range(14):
        plan_step(step, budget=256, page_size=64, reuse_interval=4)
        seen.append((int(step[STEP_SEEN]), int(step[STEP_RESELECT]), int(step[STEP_TAIL])))
    assert seen[:6] == [(251, 0, 0), (252, 0, 0), (253, 0, 0), (254, 0, 0), (255, 0, 0), (256, 0, 0)]  # fits
    assert seen[6] == (257, 1, 4)  # 5 pages: select, the tail is page 4
    assert [r for _, r, _ in seen[7:14]] == [0, 0, 0, 1, 0, 0, 0]  # every 4 steps
    assert all(t == 4 for _, _, t in seen[6:14])
    reset_step(step, 319)  # a prefill: the next step selects anew
    plan_step(step, budget=256, page_size=64, reuse_interval=4)
    assert step.tolist()[STEP_SEEN:] == [320, 3, 1, 4]
    plan_step(step, budget=256, page_size=64, reuse_interval=4)  # slot 320 starts page 5; the tail stays 4
    assert int(step[STEP_TAIL]) == 4 and int(step[STEP_DUE]) == 2


# ------------------------------------------------------------------- kernel
# batch, kv heads, groups, head_dim, seen, kinds, pads, sink, ring, local, page, selected
KERNEL_CASES = [
    (1, 2, 1, 64, 150, [0, 1], [0], 4, 32, 20, 16, 3),  # GQA 1
    (2, 4, 3, 64, 150, [0, 1, 0, 1], [0, 21], 4, 32, 20, 16, 3),  # GQA 3, padding
    (2, 2, 4, 128, 97, [0, 0], [5, 0], 0, 0, 1, 32, 2),  # GQA 4, dense heads only, tail over 2 pages
    (1, 1, 16, 32, 70, [1], [0], 0, 16, 16, 16, 0),  # GQA 16, one streaming head, no sink
    (2, 3, 2, 80, 300, [1, 0, 1], [0, 260], 8, 64, 50, 64, 2),  # head_dim 80, a row that is mostly padding
]


def _decode_case(case, dtype, seed):
    batch, num_kv, groups, dim, seen, kinds, pads, sink, ring, local, page, n_sel = case
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    kind = torch.tensor(kinds, dtype=torch.int32)
    slot = torch.zeros(num_kv, dtype=torch.int32)
    for k in (0, 1):
        slot[kind == k] = torch.arange(int((kind == k).sum()), dtype=torch.int32)
    n_dense, n_stream = int((kind == 0).sum()), int((kind == 1).sum())
    n_pages = -(-seen // page)
    tail_first = n_pages - 1 - (seen % page == 1)  # a page boundary crossed since the selection
    kv = DecodeKV(step=step_counters(seen, tail_first), page_size=page, head_kind=kind, head_slot=slot)
    if n_dense:
        cap = n_pages * page + page
        kv.dense_key, kv.dense_value = rand(batch, n_dense, cap, dim), rand(batch, n_dense, cap, dim)
        pages = torch.stack([torch.randperm(tail_first, generator=gen)[:n_sel] for _ in range(batch * n_dense)])
        pages[torch.rand(pages.shape, generator=gen) < 0.3] = -1  # rows with fewer candidates
        kv.pages = pages.view(batch, n_dense, n_sel).to(torch.int32)
    if n_stream:
        starts = torch.tensor(pads)
        kv.sink_key, kv.sink_value = rand(batch, n_stream, sink, dim), rand(batch, n_stream, sink, dim)
        kv.sink_pos = torch.stack([torch.arange(sink) + s for s in pads]) if sink else torch.empty(batch, 0, dtype=torch.long)
        kv.ring_key, kv.ring_value = rand(batch, n_stream, ring, dim), rand(batch, n_stream, ring, dim)
        kv.ring_pos = torch.full((ring,), -1, dtype=torch.long)
        slots = torch.arange(max(seen - ring, 0), seen)
        kv.ring_pos[slots % ring] = slots
        assert (starts < seen).all()
    query = rand(batch, num_kv * groups, dim)
    to_device = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in kv.__dict__.items()}
    return query.to(DEVICE), DecodeKV(**to_device), torch.tensor(pads, device=DEVICE), sink, local


@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[f"decode{i}" for i in range(len(KERNEL_CASES))])
def test_decode_kernel_matches_reference(case, dtype, splits):
    seed = KERNEL_CASES.index(case) + 7 * (dtype == torch.bfloat16)
    query, kv, kv_start, sink, local = _decode_case(case, dtype, seed)
    scale = query.shape[-1] ** -0.5
    visible, terms = Visibility(kv_start, sink=sink, local=local), LogitTerms(scale)
    out = paged_decode_triton(query, kv, visible, terms, num_splits=splits)
    as64 = DecodeKV(**{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                       for k, v in kv.__dict__.items()})
    golden = paged_decode_reference(query.double(), as64, visible, terms)
    baseline = paged_decode_reference(query, kv, visible, terms)
    # the reference rounds once at the end; the kernel rounds P to fp16/bf16 before P.V, like flash attention
    assert_close_by_rule(out, golden, baseline, slack=4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[f"decode{i}" for i in range(len(KERNEL_CASES))])
def test_host_decode_through_sdpa_equals_reference(case, dtype):
    """The decode step of a device without the Triton kernel (SDPA over the same visible tokens) against the
    reference: selected pages, padding, streaming heads; and with every token visible (no mask)."""
    from sparse_attn_hf.kernels.decode_sdpa import paged_decode_sdpa as _paged_decode_sdpa

    query, kv, kv_start, sink, local = _decode_case(case, dtype, 5)
    query, kv_start = query.cpu(), kv_start.cpu()
    for field in ("step", "head_kind", "head_slot", "dense_key", "dense_value", "pages", "sink_key", "sink_value",
                  "sink_pos", "ring_key", "ring_value", "ring_pos"):
        if getattr(kv, field) is not None:
            setattr(kv, field, getattr(kv, field).cpu())
    visible, scale = Visibility(kv_start, sink=sink, local=local), query.shape[-1] ** -0.5
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    expected = paged_decode_reference(query, kv, visible, LogitTerms(scale))
    torch.testing.assert_close(_paged_decode_sdpa(query, kv, visible, scale), expected, **tol)
    kv.step[STEP_TAIL] = 0  # the context fits the budget: every stored token is visible
    expected = paged_decode_reference(query, kv, visible, LogitTerms(scale))
    torch.testing.assert_close(_paged_decode_sdpa(query, kv, visible, scale), expected, **tol)
    # no page chosen (no selection) and no row padded: the dense heads' keys read in place, no mask built
    kv.pages = None
    visible = visible.but(kv_start=torch.zeros_like(kv_start))
    expected = paged_decode_reference(query, kv, visible, LogitTerms(scale))
    torch.testing.assert_close(_paged_decode_sdpa(query, kv, visible, scale), expected, **tol)


def test_reference_sees_exactly_the_chosen_tokens():
    """Pages and tail decide what dense heads see: a key outside them changes nothing, a key inside does."""
    case = (1, 1, 2, 16, 200, [0], [0], 0, 0, 1, 16, 2)
    query, kv, kv_start, sink, local = _decode_case(case, torch.float32, 3)
    kv.pages = torch.tensor([[[2, -1]]], dtype=torch.int32, device=DEVICE)
    kv.step[STEP_TAIL] = 11
    common = (Visibility(kv_start, sink=sink, local=local), LogitTerms(0.25))
    before = paged_decode_reference(query, kv, *common)
    kv.dense_key[0, 0, 5 * 16] += 100.0  # page 5: not chosen
    assert torch.equal(before, paged_decode_reference(query, kv, *common))
    kv.dense_key[0, 0, 2 * 16 + 3] += 100.0  # page 2: chosen
    assert not torch.equal(before, paged_decode_reference(query, kv, *common))


# ---------------------------------------------------------------- generate
def _patched(family="llama", budget=4096, reuse=4, fraction=0.5, decode_local=None, shortlist=4, kv_dtype="auto",
             **shape):
    model = tiny_model(family, **shape).to(DEVICE)
    scores = torch.rand(model.config.num_hidden_layers, model.config.num_key_value_heads,
                        generator=torch.Generator().manual_seed(5))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(
        streaming_fraction=fraction, sink_size=4, local_size=24, page_size=16, logical_page_size=4,
        token_budget=budget, reuse_interval=reuse, decode_local_size=decode_local, shortlist=shortlist,
        page_selection="always", kv_dtype=kv_dtype))  # selection on a CPU too: these tests are about it
    return model


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2", "internlm3", "glm", "glm4", "qwen3", "qwen3_moe", "phi3",
                                    "phi3_longrope"])
def test_budget_covering_the_context_equals_dense(family):
    if family == "internlm3":
        pytest.importorskip("transformers", minversion="5.0")
        try:
            from transformers import InternLM3Config  # noqa: F401
        except ImportError:
            pytest.skip("this transformers release has no InternLM3")
    ids, mask = left_padded(random_ids(2, 50), [0, 7])
    common = dict(attention_mask=mask.to(DEVICE), max_new_tokens=12, do_sample=False)
    dense = tiny_model(family).to(DEVICE)
    expected = dense.generate(ids.to(DEVICE), **common)
    model = _patched(family, budget=1024, fraction=0.0)
    assert torch.equal(model.generate(ids.to(DEVICE), **common), expected)


@torch.no_grad()
def test_selection_runs_every_reuse_interval(monkeypatch):
    import sparse_attn_hf.methods.decode_step as step_module

    calls = []

    def counting(query, store, step, *args):
        calls.append((int(step[STEP_SEEN]), int(step[STEP_RESELECT])))
        return select_pages(query, store, step, *args)

    monkeypatch.setattr(step_module, "select_pages", counting)
    model = _patched(budget=32, reuse=3, layers=1)
    calls.clear()  # on CUDA patch_model's warm-up generates on a synthetic prompt first
    model.generate(random_ids(1, 60).to(DEVICE), max_new_tokens=8, do_sample=False)
    assert [seen for seen, _ in calls] == list(range(61, 68))  # every decode step plans ...
    assert [seen for seen, again in calls if again] == [61, 64, 67]  # ... and selects at the 1st, 4th, 7th


@torch.no_grad()
@pytest.mark.parametrize("shortlist", [1, 4])
def test_small_budget_kernel_equals_reference_through_generate(shortlist):
    """Selection active (budget 2 pages < context), by the bound alone and in two stages: greedy, sampling-free
    beam search and a padded batch give the same tokens through the Triton kernels and the references; beam
    reordering moves selections."""
    model = _patched(budget=32, reuse=2, shortlist=shortlist)
    ids, mask = left_padded(random_ids(2, 70, seed=4), [0, 9])
    runs = {}
    try:
        for backend in ("reference", "triton"):
            ops.set_backend(backend)
            runs[backend] = [
                model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=6, do_sample=False),
                model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=5, num_beams=2,
                               do_sample=False),
            ]
    finally:
        ops.set_backend("auto")
    for got, expected in zip(runs["triton"], runs["reference"]):
        assert torch.equal(got, expected)


def _half_model(dtype, *, seed: int, graphs: bool, **settings):
    """A 3-layer model in half precision on the device, half of its 4 KV heads streaming, pages of 16."""
    model = tiny_model("llama", heads=8, kv_heads=4, layers=3).to(DEVICE, dtype)
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(seed))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(
        streaming_fraction=0.5, sink_size=4, decode_local_size=16, page_size=16, logical_page_size=16,
        decode_graphs=graphs, page_selection="always", **settings))
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_decode_steps_replayed_from_a_cuda_graph_give_the_eager_tokens():
    """generate() captures the decode step after two eager ones: the same tokens and scores as every step
    eager, with selection and reuse active, a padded batch, and sampling; beam search (which moves the cache's
    buffers) falls back to eager steps."""
    from sparse_attn_hf.decode_graph import DecodeGraph

    ids, mask = left_padded(random_ids(2, 150, seed=8), [0, 13])
    common = dict(attention_mask=mask.to(DEVICE), max_new_tokens=20, do_sample=False, return_dict_in_generate=True,
                  output_scores=True)
    runs = {}
    for graphs in (False, True):
        model = _half_model(torch.float16, seed=1, graphs=graphs, local_size=32, token_budget=64, reuse_interval=3)
        captured = []
        original = DecodeGraph._capture
        DecodeGraph._capture = lambda self, kwargs: captured.append(1) or original(self, kwargs)
        try:
            runs[graphs] = model.generate(ids.to(DEVICE), **common)
            assert len(captured) == (1 if graphs else 0)
            torch.manual_seed(3)
            runs[(graphs, "sampled")] = model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), do_sample=True,
                                                       top_k=4, max_new_tokens=12)
            runs[(graphs, "beams")] = model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), num_beams=2,
                                                     do_sample=False, max_new_tokens=8)
        finally:
            DecodeGraph._capture = original
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for eager, replayed in zip(runs[False].scores, runs[True].scores):
        torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
    assert torch.equal(runs[(True, "sampled")], runs[(False, "sampled")])
    assert torch.equal(runs[(True, "beams")], runs[(False, "beams")])  # reordered buffers: eager after the move


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_cuda_graph_decode_over_64_steps_with_poisoned_scratch_and_a_continuation(monkeypatch):
    """bf16, a left-padded batch, 64 replayed steps: before every replay the graph's output logits and each
    layer's page scores are filled with NaN and its short list with -7 (a replay that read them instead of
    writing them first would show; the selection itself is state kept between steps); then a continuation on the
    returned cache. The same tokens as eager steps."""
    from sparse_attn_hf.decode_graph import DecodeGraph

    graphs_seen = []
    original_capture, original_replay = DecodeGraph._capture, torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(DecodeGraph, "_capture", lambda self, kw: graphs_seen.append(self) or original_capture(self, kw))

    def poisoned_replay(graph):
        for wrapper in graphs_seen:
            if wrapper.graph is graph:
                wrapper.output["logits"].fill_(float("nan"))
                for layer in wrapper.cache.layers:
                    if "page_scores" in layer._tensors:
                        layer._tensors["page_scores"].fill_(float("nan"))
                        layer._tensors["listed"].fill_(-7)
        return original_replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", poisoned_replay)
    ids, mask = left_padded(random_ids(2, 300, seed=12), [0, 37])
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    runs = {}
    for graphs in (False, True):
        model = _half_model(torch.bfloat16, seed=2, graphs=graphs, local_size=64, token_budget=128, reuse_interval=4)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             return_dict_in_generate=True)
        longer = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1]:])], 1)
        more = model.generate(out.sequences, attention_mask=longer, **{CACHE_ARG: out.past_key_values},
                              max_new_tokens=16, min_new_tokens=16, do_sample=False)
        runs[graphs] = (out.sequences, more)
    assert len(graphs_seen) >= 1
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])


@torch.no_grad()
def test_small_budget_changes_the_result_and_continuation_reselects():
    model = _patched(budget=32, fraction=0.0, layers=2)
    ids = random_ids(1, 120, seed=6).to(DEVICE)
    sparse = model(ids).logits  # prefill is not affected by the budget
    cache = SparseCache(model)
    out = model.generate(ids, **{CACHE_ARG: cache}, max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    full = _patched(budget=1024, fraction=0.0, layers=2)
    dense = full.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    torch.testing.assert_close(out.logits[0], dense.logits[0])  # first token comes from the prefill
    assert not torch.allclose(out.logits[-1], dense.logits[-1]), "a 2-page budget should change later steps"
    assert sparse.shape[1] == 120
    more = torch.cat([out.sequences, random_ids(1, 5, seed=7).to(DEVICE)], dim=1)
    model.generate(more, **{CACHE_ARG: cache}, max_new_tokens=2, do_sample=False)
    assert all("pages" in layer._tensors for layer in cache.layers)  # decoding after the continuation selected
    # sampling decodes through the same page selection: top_k=1 samples the greedy tokens (a 2-page budget changes
    # them, see above), and a seeded top_k=5 run repeats itself
    greedy = model.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(model.generate(ids, do_sample=True, top_k=1, max_new_tokens=6, min_new_tokens=6), greedy)
    assert last_call(model).decode_steps == 5
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(model.generate(ids, do_sample=True, top_k=5, max_new_tokens=6, min_new_tokens=6))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, 126)


def test_bad_decode_settings_are_rejected():
    with pytest.raises(ValueError, match="token_budget"):
        SparseConfig(token_budget=100, page_size=64)
    with pytest.raises(ValueError, match="token_budget"):
        SparseConfig(token_budget=64, page_size=64)
    with pytest.raises(ValueError, match="reuse_interval"):
        SparseConfig(reuse_interval=0)
    with pytest.raises(ValueError, match="shortlist"):
        SparseConfig(shortlist=0)
    model = tiny_model()
    with pytest.raises(ValueError, match="token_budget"):  # checked against the profile's page size too
        patch_model(model, Profile.all_dense(model), SparseConfig(token_budget=96))


# ------------------------------------------------------------------- memory
def _decode_token(layer, key, value, kv_start):
    """Store one decode token as a decode step does: the step's counters advance first (the first layer)."""
    DecodePlan.of(layer).plan(layer)
    return layer.append_decode(key, value, kv_start)


def test_cache_bytes_with_half_the_heads_streaming_at_32k():
    """Memory target of the decoding issue: <= 0.55 x DynamicCache at 32K tokens with the decode window."""
    model = tiny_model(heads=8, kv_heads=8, layers=2, head_dim=64)
    scores = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    patch_model(model, Profile.from_scores(model, scores),
                SparseConfig(streaming_fraction=0.5, sink_size=128, local_size=4096, decode_local_size=256))
    cache = SparseCache(model, max_cache_len=32768)
    kv_start = torch.zeros(1, dtype=torch.long)
    for layer in cache.layers:
        for chunk in range(4):
            keys = torch.randn(1, 8, 8191, 64)
            layer.update(keys, keys)
            layer.append(keys, keys, kv_start)
            DecodePlan.of(layer).reset(layer)
        step = torch.randn(1, 8, 1, 64)
        _decode_token(layer, step, step, kv_start)
    ratio = cache.nbytes() / cache.dynamic_cache_nbytes()
    # dense half: K, V and 2 statistics vectors per 16 keys; streaming half: sink + decode ring
    predicted = 0.5 * (1 + 1 / 16) * 32768 / 32765 + 0.5 * (128 + 256) / 32765
    assert ratio <= 0.55 and abs(ratio - predicted) < 0.002, (ratio, predicted)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_append_equals_the_pytorch_path(dtype, monkeypatch):
    """One decode token stored by the Triton append kernel, by the reference backend and by its reference
    (``append_token_reference``) called directly: the same buffers."""
    import copy

    from sparse_attn_hf.kernels.reference import append_token_reference

    def by_reference(key, value, tensors, *, seen, **kwargs):
        append_token_reference(key, value, tensors, seen=int(seen), **kwargs)
        return True

    model = _patched(layers=1, fraction=0.5, heads=6, kv_heads=3).to(dtype)  # sink 4, local 24, pages 16/4
    states = {}
    for backend in ("reference", "triton", "function"):
        cache = SparseCache(model, max_cache_len=64)
        layer = cache.layers[0]
        gen = torch.Generator().manual_seed(9)
        prompt = torch.randn(2, 3, 6, 16, generator=gen).to(DEVICE, dtype)
        layer.update(prompt, prompt)
        mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3], device=DEVICE)  # row 1: its 4th real token comes in decode
        kv_start = cache.sequence.resolve_kv_start(mask, layer.batch, 0, 6, DEVICE)
        layer.append(prompt, prompt * 2, kv_start)
        DecodePlan.of(layer).reset(layer)  # as the attention does after storing a prompt: the counters restart there
        try:
            if backend == "function":
                monkeypatch.setattr(ops, "append_token", by_reference)
            else:
                ops.set_backend(backend)
            for _ in range(3):
                token = torch.randn(2, 3, 1, 16, generator=gen).to(DEVICE, dtype)
                _decode_token(layer, token, -token, kv_start)
        finally:
            ops.set_backend("auto")
            monkeypatch.undo()
        states[backend] = copy.deepcopy(layer._tensors)
    for other in ("triton", "function"):
        assert states["reference"].keys() == states[other].keys()
        for name, tensor in states["reference"].items():
            assert torch.equal(tensor, states[other][name]), (other, name)


@torch.no_grad()
def test_decode_graph_wrapper_is_invisible_to_generate():
    """generate() reads the forward's parameters (position_ids from the mask of a padded batch, logits_to_keep
    for a prefill that makes one row of logits): with the wrapper in place of ``model.forward`` a padded
    batch gets the same positions, hence the same logits, as without it (on the CPU every step runs the
    wrapped forward; on the GPU, the captured one)."""
    import inspect

    from sparse_attn_hf.decode_graph import DecodeGraph

    model = _patched(budget=32, fraction=0.0, layers=2)
    assert inspect.signature(DecodeGraph(model, SparseCache(model))).parameters.keys() == \
        inspect.signature(model.forward).parameters.keys()
    ids, mask = left_padded(random_ids(2, 100, seed=4), [0, 13])
    runs = []
    for wrapped in (False, True):
        cache = SparseCache(model)
        if wrapped:
            model.forward = DecodeGraph(model, cache)
        try:
            out = model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), **{CACHE_ARG: cache},
                                 max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
        finally:
            model.__dict__.pop("forward", None)
        runs.append(torch.stack(out.logits, 1))
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)


def test_decode_graph_replays_only_the_calls_it_captured():
    """The checks that send a step to the eager path (on the CPU: which forwards count as decode steps, and
    which arguments must match the captured ones)."""
    from sparse_attn_hf.decode_graph import DecodeGraph, _same_arguments

    model = _patched(budget=32, layers=1)
    cache = SparseCache(model)
    graph = DecodeGraph(model, cache)
    ids = random_ids(1, 40).to(DEVICE)
    assert graph._why_eager((), {"input_ids": ids}) == ""  # a prompt is not a decode step
    model(ids, **{CACHE_ARG: cache})
    one = ids[:, :1]
    assert graph._why_eager((), {"input_ids": one}) == ""  # outside cache.decoding(): prefill
    with cache.decoding():
        why = graph._why_eager((), {"input_ids": one, "output_attentions": True})
        assert why == "" if DEVICE == "cpu" else "attentions" in why  # CPU tensors never replay
        why = graph._why_eager((), {"input_ids": one})
        assert why == "" if DEVICE == "cpu" else "reference" in why  # fp32 runs the reference: not capturable
    assert _same_arguments({"use_cache": True, "cache": cache}, {"use_cache": True, "cache": cache})
    assert not _same_arguments({"use_cache": True}, {"use_cache": False})
    assert not _same_arguments({"x": torch.ones(1)}, {"x": torch.ones(1)})  # another tensor: not the same call


def _compile_mode_model(kv_dtype="auto"):
    model = tiny_model("llama", heads=4, kv_heads=2, layers=2).to(DEVICE)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(5))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(
        streaming_fraction=0.5, sink_size=4, local_size=24, page_size=16, logical_page_size=4, token_budget=32,
        reuse_interval=4, decode_compile=True, kv_dtype=kv_dtype))
    return model


@torch.no_grad()
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_compiled_decode_steps_compile_once_for_every_step_and_prompt_of_a_bucket(kv_dtype, monkeypatch):
    """SparseConfig(decode_compile=True): torch.compile(fullgraph=True) traces a decode step whole (the decode
    ops are registered operators) and, since the step reads no host value that changes per step or per prompt,
    16 steps and then a prompt of another length in the same capacity bucket (128) compile one graph in all.
    The compiled steps, with page selection and reuse active, give the eager logits; the host length catches
    up from the device. With FP8 pages too (a ring of two pages: steps seal pages)."""
    from torch._dynamo.utils import counters

    from sparse_attn_hf.kernels import fp8

    monkeypatch.setattr(fp8, "RECENT", 32)
    model = _compile_mode_model(kv_dtype)

    def step(token, position, cache):
        return model(token, position_ids=position, **{CACHE_ARG: cache}).logits

    def run(ids, forward, steps=16):
        cache = SparseCache(model, max_cache_len=ids.shape[1] + steps)
        logits = model(ids, **{CACHE_ARG: cache}).logits[:, -1:]
        out = []
        with cache.decoding(prompt_end=ids.shape[1]):
            for i in range(steps):
                logits = forward(logits.argmax(-1), torch.tensor([[ids.shape[1] + i]], device=DEVICE), cache)
                out.append(logits)
        assert cache.get_seq_length() == ids.shape[1] + steps
        return torch.cat(out, 1)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    counters.clear()
    for length in (100, 90):
        ids = random_ids(1, length, seed=length).to(DEVICE)
        torch.testing.assert_close(run(ids, compiled), run(ids, step), rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1


@torch.no_grad()
def test_transformers_compiled_generate_gives_the_eager_tokens():
    """Transformers' own decode compile (``compile_config``; here on the CPU with its all-devices switch and the
    aot_eager backend) on a SparseCache: a left-padded batch greedy over 64 steps, sampling with a fixed seed
    and a continuation on the returned cache give the eager tokens; a second prompt of the same bucket
    compiles nothing new."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = _compile_mode_model()
    config = CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
    config._compile_all_devices = True
    torch._dynamo.reset()

    def both(ids, mask, sample=False, **kwargs):
        out = {}
        for compiled in (False, True):
            torch.manual_seed(0)
            out[compiled] = model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), do_sample=sample,
                                           return_dict_in_generate=True, **kwargs,
                                           **({"compile_config": config} if compiled else {"disable_compile": True}))
        assert torch.equal(out[True].sequences, out[False].sequences)
        return out

    ids, mask = left_padded(random_ids(2, 100, seed=3), [0, 11])
    first = both(ids, mask, max_new_tokens=64)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    both(*left_padded(random_ids(2, 90, seed=4), [3, 0]), max_new_tokens=64)
    assert counters["stats"]["unique_graphs"] == graphs  # the same bucket: nothing recompiled
    both(ids, mask, sample=True, top_k=5, max_new_tokens=12)
    for compiled, out in first.items():  # a continuation on each returned cache
        longer = torch.cat([mask.to(DEVICE), torch.ones_like(out.sequences[:, ids.shape[1]:])], 1)
        kwargs = {"compile_config": config} if compiled else {"disable_compile": True}
        first[compiled] = model.generate(out.sequences, attention_mask=longer, **{CACHE_ARG: out.past_key_values},
                                         max_new_tokens=8, do_sample=False, **kwargs)
    assert torch.equal(first[True], first[False])


def test_registered_decode_ops_pass_torch_library_checks():
    """The custom ops' schemas, fake implementations and mutation declarations (``torch.library.opcheck``) on
    random inputs: page scores (mutates its output) and a decode step over dense and streaming heads."""
    gen = torch.Generator().manual_seed(11)
    batch, heads, groups, dim, page, logical = 2, 2, 2, 16, 16, 4
    keys = torch.randn(batch, heads, 128, dim, generator=gen)
    kv_start = torch.tensor([0, 5])
    kmin, kmax = _stats(keys, logical, kv_start)
    q = torch.randn(batch, heads, groups, dim, generator=gen)
    seen, one = torch.tensor([100], dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    out = torch.zeros(batch, heads, 128 // page)
    torch.library.opcheck(torch.ops.sparse_attn_hf.physical_page_scores,
                          (q, kmin, kmax, kv_start, seen, out, one, page, logical))
    listed = torch.zeros(batch, heads, 3, dtype=torch.int32)
    torch.library.opcheck(torch.ops.sparse_attn_hf.top_pages, (out, listed, one))
    torch.library.opcheck(torch.ops.sparse_attn_hf.shortlist_pages,
                          (q, keys, out, listed, kv_start, seen, listed[..., :2].clone(), one, page, dim ** -0.5, None))
    step = step_counters(100)
    kind, slot = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32)
    dense = keys[:, :1].contiguous()
    pages = torch.tensor([[[0, 2]], [[1, -1]]], dtype=torch.int32)
    sink, ring = keys[:, 1:, :4].contiguous(), keys[:, 1:, 96:112].contiguous()
    sink_pos = (kv_start[:, None] + torch.arange(4)[None]).long()
    ring_pos = torch.arange(96, 112).long()
    query = torch.randn(batch, heads * groups, dim, generator=gen)
    torch.library.opcheck(torch.ops.sparse_attn_hf.paged_decode,
                          (query, step, [kind, slot, dense, dense, pages, sink, sink, sink_pos, ring, ring, ring_pos],
                           page, kv_start, 4, 16, dim ** -0.5))


@torch.no_grad()
def test_a_continuation_is_sized_before_its_decode_steps(monkeypatch):
    """A continuation that needs more room than the returned cache has grows the buffers once, in its prefill, to
    prompt + new tokens: never inside a decode step (which would end the decode graph for the rest of the call).
    On a GPU (half precision, the Triton path) its decode steps are then replayed from the graph."""
    half = DEVICE == "cuda"
    model = (_half_model(torch.bfloat16, seed=4, graphs=True, local_size=32, token_budget=64) if half else
             _patched(budget=64, fraction=0.5))
    ids = random_ids(1, 109, seed=9).to(DEVICE)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(out)
    grown = []
    original = SparseLayer._ensure_capacity

    def recording(layer, needed):
        before = layer.capacity
        original(layer, needed)
        if layer.capacity != before:
            grown.append((layer.layer_idx, layer.sequence.is_decode_step(layer.seen, 1)))

    monkeypatch.setattr(SparseLayer, "_ensure_capacity", recording)
    mask = torch.ones_like(out.sequences)
    more = model.generate(out.sequences, attention_mask=mask, **{CACHE_ARG: cache}, max_new_tokens=300,
                          min_new_tokens=300, do_sample=False)
    assert more.shape[1] == out.sequences.shape[1] + 300
    dense_layers = {layer.layer_idx for layer in cache.layers if layer.dense_heads}
    assert sorted(i for i, _ in grown) == sorted(dense_layers), grown  # once per layer with dense heads
    assert not any(in_decode for _, in_decode in grown), grown
    assert all(layer.capacity >= more.shape[1] - 1 for layer in cache.layers if layer.dense_heads)
    record = last_call(model)
    assert record.decode_steps == 299
    if half:
        assert record.graph_steps == 299 - 2, record  # every step after the two warm-up steps replayed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_every_configuration_replays_its_decode_graph_after_others_ran():
    """One process, patch and unpatch between configurations (issue 35's sequence): stock, exact all-dense, 50%
    streaming with page selection. Each patched generate() replays every decode step after the two warm-up steps
    from its graph; exact all-dense gives stock's tokens."""
    model = tiny_model("llama", heads=8, kv_heads=4, layers=3).to(DEVICE, torch.bfloat16)
    ids = random_ids(1, 700, seed=21).to(DEVICE)
    common = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)
    stock = model.generate(ids, **common)
    configs = [(Profile.all_dense(model), SparseConfig(page_size=16, logical_page_size=16)),
               (Profile.from_scores(model, torch.rand(3, 4, generator=torch.Generator().manual_seed(2))),
                SparseConfig(streaming_fraction=0.5, sink_size=4, local_size=64, decode_local_size=16, page_size=16,
                             logical_page_size=16, token_budget=128))]
    for profile, settings in configs * 2:
        patch_model(model, profile, settings)
        out = model.generate(ids, **common)
        record = last_call(model)
        assert record.decode_steps == 39 and record.graph_steps == 37, record
        if profile.method == "all dense":
            assert torch.equal(out, stock)
        unpatch_model(model)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU default")
@torch.no_grad()
def test_a_cpu_decodes_every_stored_token_by_default():
    """page_selection="auto" (the default) selects no page on a CPU: the dense heads read every stored token, the
    same as "never" (exact), unlike "always" under a 2-page budget; the record says so."""
    ids = random_ids(1, 120, seed=6)
    out = {}
    for mode in ("auto", "never", "always"):
        model = tiny_model("llama", heads=4, kv_heads=2, layers=2)
        scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(5))
        patch_model(model, Profile.from_scores(model, scores), SparseConfig(
            streaming_fraction=0.5, sink_size=4, local_size=24, page_size=16, logical_page_size=4, token_budget=32,
            page_selection=mode))
        out[mode] = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                                   output_logits=True)
        if mode == "auto":
            assert "no page selection" in (last_call(model).decode_note or "")
    for a, b in zip(out["auto"].logits, out["never"].logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(out["auto"].logits[-1], out["always"].logits[-1])
    with pytest.raises(ValueError, match="page_selection"):
        SparseConfig(page_selection="sometimes")


@torch.no_grad()
def test_the_cache_surface_a_decode_graph_uses():
    """``decode_graph`` reads the cache through three calls: the buffers' addresses (a replay needs them where the
    capture saw them: a beam reorder moves them), the host-side lengths, and their advance by a replayed step (or
    their restore after a failed capture); and ``why_not_replayable`` says why a step cannot replay."""
    model = _patched(budget=32, reuse=3, layers=2)
    cache = SparseCache(model)
    model(random_ids(2, 40).to(DEVICE), **{CACHE_ARG: cache})
    assert cache.lengths() == [40, 40]
    addresses = cache.buffer_addresses()
    assert len(addresses) == sum(len(layer._tensors) for layer in cache.layers) and addresses
    cache.advance()
    assert cache.lengths() == [41, 41] and cache.get_seq_length() == 41
    cache.set_lengths([40, 40])
    assert cache.lengths() == [40, 40]
    assert cache.buffer_addresses() == addresses  # nothing moved
    cache.reorder_cache(torch.tensor([1, 0], device=DEVICE))
    assert cache.buffer_addresses() != addresses
    layers = [layer for layer in cache.layers if layer.is_initialized]
    device = torch.device(DEVICE)
    # float32 weights: a step runs part of the reference (on the CPU: not CUDA), which a graph cannot replay
    assert DecodePlan.why_not_replayable(layers, device) == ops.decode_on_host(torch.float32, 16, device, 16,
                                                                              4) is not None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "decode_on_host", lambda *args: None)  # as a GPU step of fp16/bf16 would be
        assert DecodePlan.why_not_replayable(layers, device) is None
        for layer in layers:
            layer.seen = layer.capacity  # the next token would not fit: the buffers would have to grow
        assert "grow" in DecodePlan.why_not_replayable(layers, device)
