"""FP8 pages (issue 32's storage format): quantizing sealed pages with a scale per (page, KV head), its error bound,
and what Triton reads back from e4m3."""

import pytest
import torch

from sparse_attn_hf.kernels.fp8 import (
    E4M3_MAX,
    FP8,
    MIN_SCALE,
    dequantize_pages,
    error_bound,
    page_scales,
    quantize_pages,
)

from conftest import DEVICE

SLACK = 1 + 1e-6  # float32 division before the rounding to e4m3


def _keys(batch, heads, pages, page, dim, seed, dtype=torch.float32):
    """Keys with a spread of magnitudes across pages (1e-3 .. 1e2), a few large channels and one all-zero page."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, pages * page, dim, generator=gen)
    magnitude = 10.0 ** torch.empty(batch, heads, pages, 1, 1).uniform_(-3, 2, generator=gen)
    x = (x.view(batch, heads, pages, page, dim) * magnitude).view(batch, heads, pages * page, dim)
    x[..., :3] *= 20  # outlier channels, as keys have
    x[:, :, :page] = 0  # an empty (all-zero) page keeps a finite scale
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, pages, page, dim", [(1, 1, 2, 16, 64), (2, 3, 5, 64, 128), (3, 2, 7, 16, 80)])
def test_round_trip_is_within_the_documented_bound(batch, heads, pages, page, dim, dtype):
    x = _keys(batch, heads, pages, page, dim, seed=pages * dim, dtype=dtype)
    q, scales = quantize_pages(x, page)
    assert q.dtype == FP8 and q.shape == x.shape and scales.shape == (batch, heads, pages)
    assert scales.dtype == torch.float32 and bool((scales >= MIN_SCALE).all())
    back = dequantize_pages(q, scales, page)
    error = (back - x.float()).abs()
    bound = error_bound(x, scales, page)
    assert bool((error <= bound * SLACK).all()), float((error / bound).max())
    assert float((error / bound).max()) > 0.3  # the bound is near what rounding takes (not a loose check)
    assert torch.equal(back[:, :, :page], torch.zeros_like(back[:, :, :page]))  # the zero page reads back zeros
    # each page's largest element lands on the largest code: the range is used, nothing saturates
    per_page = q.float().abs().view(batch, heads, pages, -1).amax(-1)
    assert torch.equal(per_page[:, :, 1:], torch.full_like(per_page[:, :, 1:], E4M3_MAX))


def test_an_outlier_page_costs_only_its_own_page():
    """A scale per (page, head): a page holding a 1000x outlier reads back no worse than before, and its neighbours
    are stored exactly as without it. With one scale per tensor the neighbours would lose their small values."""
    x = _keys(1, 2, 6, 16, 64, seed=3)
    spiked = x.clone()
    spiked[0, 1, 40, 5] = 1000 * x.abs().max()  # page 2 of head 1
    q, scales = quantize_pages(x, 16)
    q_spiked, scales_spiked = quantize_pages(spiked, 16)
    changed = torch.zeros(1, 2, 6, dtype=torch.bool, device=DEVICE)
    changed[0, 1, 2] = True
    assert torch.equal(scales_spiked[~changed], scales[~changed])
    same_tokens = ~changed.repeat_interleave(16, dim=2)
    assert torch.equal(q_spiked.float()[same_tokens], q.float()[same_tokens])
    # what a per-tensor scale would do to the neighbours: far outside the per-page bound
    global_scale = torch.full_like(scales, float(spiked.abs().max()) / E4M3_MAX)
    coarse = dequantize_pages((spiked / global_scale.repeat_interleave(16, 2)[..., None]).to(FP8), global_scale, 16)
    bound = error_bound(spiked, scales_spiked, 16)
    assert bool(((coarse - spiked).abs() > bound * SLACK)[same_tokens.expand_as(spiked[..., 0])].any())


def test_scales_and_bad_input():
    x = torch.zeros(1, 1, 32, 8, device=DEVICE)
    x[0, 0, 20, 3] = -896.0
    scales = page_scales(x, 16)
    assert torch.equal(scales.cpu(), torch.tensor([[[MIN_SCALE, 2.0]]], dtype=torch.float32))
    with pytest.raises(ValueError, match="whole pages"):
        quantize_pages(torch.zeros(1, 1, 20, 8, device=DEVICE), 16)


def test_triton_reads_every_e4m3_code_as_torch_does():
    """Kernels dequantize in registers: Triton's e4m3 load (``.to(tl.float32)``) must give torch's value for each of
    the 254 finite codes, in the CPU interpreter as on the GPU. (The interpreter reads the two NaN codes, 0x7F and
    0xFF, as +-480; stored pages never hold them: quantizing clamps to +-448.)"""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 loads need sm89 or newer")

    @triton.jit
    def _read(SRC, DST, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(DST + offs, tl.load(SRC + offs).to(tl.float32))

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).to(DEVICE)
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _read[(1,)](codes, out, N=256)
    expected = codes.float()
    finite = ~torch.isnan(expected)
    assert int(finite.sum()) == 254
    assert torch.equal(out[finite], expected[finite])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, heads, pages, page, dim", [(1, 1, 1, 16, 16), (2, 3, 9, 16, 64), (1, 2, 17, 64, 96),
                                                             (2, 1, 5, 32, 128)])
def test_read_back_kernel_matches_the_reference(batch, heads, pages, page, dim, dtype):
    """The one-pass read-back of a prompt chunk (``ops.read_fp8_pages``'s kernel) against ``dequantize_pages`` on
    fresh codes and scales (pages past a program's share, a head_dim below its power of two, a view of a wider
    buffer as the cache passes it). The interpreter rounds float32 -> 16-bit by truncation: 1 ulp there."""
    from sparse_attn_hf.kernels.fp8 import read_pages_triton

    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 loads need sm89 or newer")
    codes, scales = quantize_pages(_keys(batch, heads, pages + 3, page, dim, seed=pages + dim), page)
    codes, scales = codes[:, :, : pages * page], scales[:, :, :pages]  # the sealed part of a longer buffer
    out = torch.full((batch, heads, pages * page + 5, dim), float("nan"), dtype=dtype, device=DEVICE)
    got = read_pages_triton(codes, scales, page, out[:, :, : pages * page])
    expected = dequantize_pages(codes, scales, page, dtype=dtype)
    ulp = torch.finfo(dtype).eps * expected.float().abs()
    assert torch.all((got.float() - expected.float()).abs() <= (0 if DEVICE == "cuda" else 1) * ulp)
    assert torch.isnan(out[:, :, pages * page :]).all()  # nothing written past the pages


def test_read_fp8_pages_runs_the_kernel_or_the_reference():
    """``ops.read_fp8_pages``: the kernel where the backend says so, else the reference in chunks: the same values."""
    from sparse_attn_hf.ops import dispatch

    codes, scales = quantize_pages(_keys(1, 2, 6, 16, 32, seed=9), 16)
    expected = dequantize_pages(codes, scales, 16, dtype=torch.bfloat16)
    for backend in ("reference", "triton"):
        dispatch.set_backend(backend)
        try:
            got = ops.read_fp8_pages(codes, scales, 16, torch.empty_like(expected))
        finally:
            dispatch.set_backend("auto")
        assert torch.allclose(got.float(), expected.float(), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=0)


# ------------------------------------------------------------------ FP8 pages in the cache and the kernels
import copy  # noqa: E402

from helpers import assert_close_by_rule, left_padded, random_ids  # noqa: E402
from test_decode import KERNEL_CASES, _decode_case, _decode_token, _patched, _shortlist_case  # noqa: E402

from sparse_attn_hf import SparseCache, SparseConfig, ops  # noqa: E402
from sparse_attn_hf.compat import CACHE_ARG  # noqa: E402
from sparse_attn_hf.kernels.decode import paged_decode_triton  # noqa: E402
from sparse_attn_hf.kernels.decode_sdpa import paged_decode_sdpa  # noqa: E402
from sparse_attn_hf.kernels import fp8 as fp8_format  # noqa: E402
from sparse_attn_hf.kernels.fp8 import first_recent_page, stored_tokens  # noqa: E402
from sparse_attn_hf.kernels.layout import DecodeKV, LogitTerms, Visibility, step_counters  # noqa: E402
from sparse_attn_hf.kernels.reference import (  # noqa: E402
    paged_decode_reference,
    shortlist_page_scores_reference,
    shortlist_pages_reference,
)
from sparse_attn_hf.kernels.selection import shortlist_pages_triton  # noqa: E402
from sparse_attn_hf.methods.decode_step import DecodePlan  # noqa: E402


def _as_fp8(kv: DecodeKV, recent_pages: int = 2) -> DecodeKV:
    """The same decode state with the dense heads' pages stored in FP8: the sealed pages quantized, the newest
    ``recent_pages`` pages in the ring of recent tokens (slot p at index p % ring size); the ring's other places hold
    garbage that must never be read."""
    page, seen = kv.page_size, kv.seen
    size = recent_pages * page
    fp8 = copy.copy(kv)
    fp8.dense_key, fp8.key_scale = quantize_pages(kv.dense_key, page)
    fp8.dense_value, fp8.value_scale = quantize_pages(kv.dense_value, page)
    sealed = first_recent_page(seen, page, size) * page
    slots = torch.arange(sealed, seen, device=kv.dense_key.device)
    for name in ("key", "value"):
        ring = torch.full((*kv.dense_key.shape[:2], size, kv.dense_key.shape[3]), 1e4, dtype=kv.dense_key.dtype,
                          device=kv.dense_key.device)
        ring[:, :, slots % size] = getattr(kv, "dense_" + name)[:, :, slots]
        setattr(fp8, "recent_" + name, ring)
    return fp8


def _read_back(kv: DecodeKV, dtype) -> DecodeKV:
    """The FP8 state as plain pages of ``dtype`` holding what it stores (the reference's reading)."""
    plain = copy.copy(kv)
    cap = kv.dense_key.shape[2]
    for name in ("key", "value"):
        stored = stored_tokens(getattr(kv, "dense_" + name), getattr(kv, name + "_scale"),
                               getattr(kv, "recent_" + name), kv.seen, kv.page_size, dtype)
        setattr(plain, "dense_" + name, torch.nn.functional.pad(stored, (0, 0, 0, cap - kv.seen)))
    plain.key_scale = plain.value_scale = plain.recent_key = plain.recent_value = None
    for name in ("sink_key", "sink_value", "ring_key", "ring_value"):
        if getattr(kv, name) is not None:
            setattr(plain, name, getattr(kv, name).to(dtype))
    return plain


@pytest.mark.parametrize("splits", [1, None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in KERNEL_CASES if 0 in c[5]], ids=["gqa1", "gqa3-pad", "dense-only",
                                                                               "d80-mostly-pad"])
def test_decode_kernel_reads_fp8_pages_as_the_reference(case, dtype, splits):
    """The decode kernel on FP8 pages (codes read as the query's dtype, the scales on scores and weighted values,
    the open page from the tail) against the reference (dequantize, then attend), awkward shapes included."""
    seed = KERNEL_CASES.index(case) + 11
    query, kv, kv_start, sink, local = _decode_case(case, dtype, seed)
    kv = _as_fp8(kv)
    visible, terms = Visibility(kv_start, sink=sink, local=local), LogitTerms(query.shape[-1] ** -0.5)
    out = paged_decode_triton(query, kv, visible, terms, num_splits=splits)
    golden = paged_decode_reference(query.double(), _read_back(kv, torch.float64), visible, terms)
    baseline = paged_decode_reference(query, kv, visible, terms)
    assert_close_by_rule(out, golden, baseline, slack=4e-3 if dtype == torch.bfloat16 else 5e-4)
    # the reading differs from the unquantized pages by the documented error, not by a wrong page
    unquantized = paged_decode_reference(query, _decode_case(case, dtype, seed)[1], visible, terms)
    assert (out.float() - unquantized.float()).abs().max() < 0.15


@pytest.mark.parametrize("case", [KERNEL_CASES[1], KERNEL_CASES[2]], ids=["gqa3-pad", "dense-only"])
def test_host_decode_reads_fp8_pages_as_the_reference(case):
    query, kv, kv_start, sink, local = _decode_case(case, torch.float32, 3)
    query, kv_start = query.cpu(), kv_start.cpu()
    kv = DecodeKV(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in _as_fp8(kv).__dict__.items()})
    visible, scale = Visibility(kv_start, sink=sink, local=local), query.shape[-1] ** -0.5
    expected = paged_decode_reference(query, _read_back(kv, torch.float32), visible, LogitTerms(scale))
    torch.testing.assert_close(paged_decode_reference(query, kv, visible, LogitTerms(scale)), expected)
    torch.testing.assert_close(paged_decode_sdpa(query, kv, visible, scale), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shortlist_reads_fp8_pages_as_the_reference(dtype):
    """Page selection's second stage on FP8 keys: the kernel against the reference, and the reference against
    the same ranking on the keys read back."""
    batch, heads, groups, dim, page, pads = 2, 3, 4, 64, 64, [0, 300]
    q, keys, bound, listed, kv_start, seen = _shortlist_case(batch, heads, groups, dim, page, pads, seed=8, dtype=dtype)
    listed[:, :, 0] = (seen - 1) // page - 1  # a listed page still in the ring (the ring holds the newest two)
    stored = _as_fp8(DecodeKV(step=step_counters(seen), page_size=page, head_kind=None, head_slot=None,
                              dense_key=keys, dense_value=keys))
    codes, scales, recent = stored.dense_key, stored.key_scale, stored.recent_key
    common = dict(kv_start=kv_start, page_size=page, scale=dim ** -0.5, softcap=None)
    read = stored_tokens(codes, scales, recent, seen, page)
    mass = shortlist_page_scores_reference(q, codes, bound, listed, seen=seen, key_scale=scales, recent=recent, **common)
    torch.testing.assert_close(mass, shortlist_page_scores_reference(q, read, bound, listed, seen=seen, **common))
    expected = shortlist_pages_reference(q, codes, bound, listed, seen=seen, k=3, key_scale=scales, recent=recent,
                                         **common)
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    out = torch.full((batch, heads, 3), 99, dtype=torch.int32, device=DEVICE)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    got = shortlist_pages_triton(on(q), on(codes), on(bound), on(listed).int(), seen=one * seen, out=out,
                                 reselect=one, key_scale=on(scales), recent=on(recent),
                                 **{**common, "kv_start": on(kv_start)})
    chosen = lambda pages: mass.gather(2, pages.cpu().long().clamp(min=0)).sort(-1).values  # noqa: E731
    tol = dict(rtol=2e-2, atol=2e-3) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chosen(got).nan_to_num(posinf=9), chosen(expected).nan_to_num(posinf=9), **tol)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_steps_seal_pages_as_a_prefill_does(dtype, monkeypatch):
    """A prompt stored in FP8 then decoded token by token, through the append kernel and through its reference:
    the same bytes; and the pages the steps sealed hold exactly the codes and scales a one-shot prefill of the
    same tokens stores (page statistics too, from the unquantized keys); padding is stored as zeros."""
    monkeypatch.setattr(fp8_format, "RECENT", 32)  # a ring of two pages of 16: 60 tokens seal pages 0 and 1
    model = _patched(layers=1, fraction=0.5, heads=6, kv_heads=3, kv_dtype="fp8").to(dtype)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 3, 60, 16, generator=gen).to(DEVICE, dtype)
    mask = torch.tensor([[1] * 60, [0] * 5 + [1] * 55], device=DEVICE)
    states = {}
    for backend in ("reference", "triton", "one shot"):
        cache = SparseCache(model, max_cache_len=64)
        layer = cache.layers[0]
        prompt = 60 if backend == "one shot" else 7  # decode steps seal pages 0 and 1 (at slots 32 and 48)
        layer.update(tokens[:, :, :prompt], tokens[:, :, :prompt])
        kv_start = cache.sequence.resolve_kv_start(mask[:, :prompt], layer.batch, 0, prompt, DEVICE)
        layer.append(tokens[:, :, :prompt], -tokens[:, :, :prompt], kv_start)
        DecodePlan.of(layer).reset(layer)
        try:
            ops.set_backend("reference" if backend == "one shot" else backend)
            for i in range(prompt, 60):
                _decode_token(layer, tokens[:, :, i : i + 1], -tokens[:, :, i : i + 1], kv_start)
        finally:
            ops.set_backend("auto")
        states[backend] = {k: v.view(torch.uint8) if v.dtype == FP8 else v for k, v in layer._tensors.items()}
        assert layer.seen == 60
    for name in ("dense_key", "dense_value", "key_scale", "value_scale", "key_min", "key_max"):
        assert torch.equal(states["reference"][name], states["triton"][name]), name
        assert torch.equal(states["reference"][name], states["one shot"][name]), name
    ring = torch.arange(32, 60, device=DEVICE) % 32  # the ring's places of slots 32..59
    for name in ("recent_key", "recent_value"):
        for other in ("triton", "one shot"):
            assert torch.equal(states["reference"][name][:, :, ring], states[other][name][:, :, ring]), (other, name)
    dense = layer.dense_idx
    expected, _ = quantize_pages(tokens.index_select(1, dense)[:, :, :32].masked_fill(
        (torch.arange(32, device=DEVICE) < 5)[None, :, None] & (torch.arange(2, device=DEVICE) == 1)[:, None, None, None],
        0), 16)
    assert torch.equal(states["one shot"]["dense_key"][:, :, :32], expected.view(torch.uint8))


@torch.no_grad()
def test_chunked_prefill_reads_back_what_it_stored(monkeypatch):
    """A prompt stored in chunks that start inside a page: each later chunk attends to the stored past read back
    (sealed pages dequantized, the ring's newest pages as they came), and the pages hold what a one-shot prefill
    stores."""
    monkeypatch.setattr(fp8_format, "RECENT", 32)  # a ring of two pages of 16
    model = _patched(layers=1, fraction=0.0, heads=4, kv_heads=2, kv_dtype="fp8")
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(1, 2, 50, 16, generator=gen).to(DEVICE)
    kv_start = torch.zeros(1, dtype=torch.long, device=DEVICE)
    one_shot = SparseCache(model).layers[0]
    one_shot.update(tokens, tokens)
    one_shot.append(tokens, tokens, kv_start)
    chunked = SparseCache(model).layers[0]
    for lo, hi in ((0, 10), (10, 37), (37, 50)):
        chunked.update(tokens[:, :, lo:hi], tokens[:, :, lo:hi])
        view = chunked.append(tokens[:, :, lo:hi], tokens[:, :, lo:hi], kv_start)
        assert view.dense_key.shape[2] == hi and view.dense_key.dtype == tokens.dtype
        torch.testing.assert_close(view.dense_key[:, :, lo:], tokens[:, :, lo:hi], rtol=0, atol=0)  # new: as came
        sealed = first_recent_page(lo, 16, 32) * 16
        read = dequantize_pages(*quantize_pages(tokens[:, :, :sealed], 16), 16) if sealed else tokens[:, :, :0]
        torch.testing.assert_close(view.dense_key[:, :, :sealed], read, rtol=0, atol=0)
        torch.testing.assert_close(view.dense_key[:, :, sealed:lo], tokens[:, :, sealed:lo], rtol=0, atol=0)
    for name, sealed in (("dense_key", 32), ("key_scale", 2), ("key_min", 12), ("key_max", 12)):  # 2 pages sealed
        a, b = one_shot._tensors[name][:, :, :sealed], chunked._tensors[name][:, :, :sealed]  # capacities differ
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8 else b)


@torch.no_grad()
def test_fp8_pages_follow_model_dtype_pages_through_prefill_decode_and_a_continuation(monkeypatch):
    """A padded batch prefilled, decoded 20 steps with page selection (teacher-forced: the same tokens for both), then
    continued by 3 tokens on the same cache (a chunk that starts inside a page, reading the stored pages back): the
    logits with FP8 pages stay within 3% of those with model-dtype pages (measured: at most 0.9%), and the pages take
    a quarter of the float32 bytes."""
    monkeypatch.setattr(fp8_format, "RECENT", 32)  # a ring of two pages of 16: most pages are sealed
    ids, mask = left_padded(random_ids(2, 150, seed=6), [0, 21])
    forced = random_ids(2, 23, seed=7)
    runs, caches = {}, {}
    for kv_dtype in ("auto", "fp8"):
        # the bound alone selects (statistics of unquantized keys: the same pages), so what differs is the reading
        model = _patched(budget=64, layers=2, heads=4, kv_heads=2, kv_dtype=kv_dtype, shortlist=1)
        cache = SparseCache(model)
        seen_mask = mask.to(DEVICE)
        logits = [model(ids.to(DEVICE), attention_mask=seen_mask, **{CACHE_ARG: cache}).logits[:, -1]]
        with cache.decoding():
            for i in range(20):
                seen_mask = torch.cat([seen_mask, torch.ones_like(seen_mask[:, :1])], dim=1)
                logits.append(model(forced[:, i : i + 1].to(DEVICE), attention_mask=seen_mask,
                                    **{CACHE_ARG: cache}).logits[:, -1])
        seen_mask = torch.cat([seen_mask, torch.ones_like(seen_mask[:, :3])], dim=1)
        logits.append(model(forced[:, 20:].to(DEVICE), attention_mask=seen_mask, **{CACHE_ARG: cache}).logits[:, -1])
        runs[kv_dtype], caches[kv_dtype] = torch.stack(logits, 1), cache
    a, b = runs["auto"], runs["fp8"]
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=0, atol=0)  # a one-shot prefill attends in the model's dtype
    error = (a - b).abs().amax(-1) / a.abs().amax(-1)  # per row and step, relative to the largest logit
    assert float(error.max()) < 0.03, error
    assert not torch.equal(a[:, 1:], b[:, 1:])  # decode steps and the continuation read FP8 pages
    assert int(caches["fp8"].layers[0].step[0]) == 173
    pages = lambda cache: sum(cache.layers[0]._tensors[n].nbytes for n in ("dense_key", "dense_value"))  # noqa: E731
    assert pages(caches["fp8"]) * 4 == pages(caches["auto"])  # float32 tiny model: 4 bytes -> 1


def test_kv_dtype_is_validated():
    with pytest.raises(ValueError, match="kv_dtype"):
        SparseConfig(kv_dtype="int4")


@torch.no_grad()
def test_beam_reordering_moves_fp8_pages_as_bytes(monkeypatch):
    """Beam search reorders the cache's rows: FP8 pages, their scales and the ring move with their row, the pages
    still e4m3."""
    monkeypatch.setattr(fp8_format, "RECENT", 32)
    model = _patched(layers=1, fraction=0.0, heads=4, kv_heads=2, kv_dtype="fp8")
    layer = SparseCache(model).layers[0]
    tokens = torch.randn(2, 2, 50, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    layer.update(tokens, tokens)
    layer.append(tokens, -tokens, torch.zeros(2, dtype=torch.long, device=DEVICE))
    before = {k: v.clone() for k, v in layer._tensors.items()}
    layer.reorder_cache(torch.tensor([1, 0], device=DEVICE))
    for name in ("dense_key", "dense_value", "key_scale", "recent_key", "key_min"):
        assert layer._tensors[name].dtype == before[name].dtype
        swapped = before[name].view(torch.uint8) if before[name].dtype == FP8 else before[name]
        now = layer._tensors[name].view(torch.uint8) if layer._tensors[name].dtype == FP8 else layer._tensors[name]
        assert torch.equal(now, swapped.flip(0)), name
    layer.batch_repeat_interleave(2)
    assert layer._tensors["dense_key"].shape[0] == 4 and layer._tensors["dense_key"].dtype == FP8


def test_fp8_pages_on_a_gpu_older_than_ada_are_refused_at_patch_time(monkeypatch):
    """e4m3 in Triton needs compute capability 8.9: an A100 gets a clear error from patch_model, not a compile
    failure in the first decode step."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="compute capability 8.9.*A100.*kv_dtype='auto'"):
        fp8_format.check_device(torch.device("cuda", 0))
    fp8_format.check_device(torch.device("cpu"))  # the references run there
