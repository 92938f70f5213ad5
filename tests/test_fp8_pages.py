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
