"""FP8 (e4m3) pages with one float32 scale per (page, KV head): the storage format of issue 32's sealed dense pages.

A page of ``page_size`` tokens of one KV head is stored as ``round_e4m3(x / s)`` with ``s = max(amax / 448,
MIN_SCALE)``, ``amax`` the largest magnitude in the page (every token and channel); it is read back as ``q * s``.
Pages a prefill seals are quantized in PyTorch (:func:`quantize_pages`), with an explicit clamp to +-448 (older
PyTorch releases may give NaN on overflow instead of saturating); a page a decode step seals is quantized by the
append kernel (:func:`_quantize_page`), which rounds to the e4m3 grid in float32 arithmetic before the cast (Triton's
CPU interpreter rounds a plain fp32 -> fp8 cast wrongly), so both give the same codes, bit for bit. Kernels read
pages back exactly: an e4m3 code is a bfloat16 and a float16 value, and the scale multiplies the page's scores
and its weighted values (:func:`stored_tokens` is the host's reading, for references).

**Layout in a SparseCache layer** (``SparseConfig(kv_dtype="fp8")``): ``dense_key``/``dense_value`` hold e4m3 codes
[B, Hd, capacity, D], ``key_scale``/``value_scale`` float32 [B, Hd, capacity / page_size]; the open page (slots
``seen // page_size * page_size .. seen - 1``) lives in ``tail_key``/``tail_value`` [B, Hd, page_size, D] in the
model's dtype, at index ``slot % page_size``, until its last token arrives and it is sealed.

**What it keeps.** e4m3 has 3 mantissa bits: an element whose scaled magnitude ``|x| / s`` is at least 2^-6 (a
normal number) comes back within a relative error of 2^-4; below that (subnormals, steps of 2^-9) within an
absolute error of ``s * 2^-10``. So every element keeps ``|x - x_hat| <= max(|x| * 2^-4, s * 2^-10)``
(:func:`error_bound`). The scale gives range, not precision: no saturation and no calibration, but a page holding
one outlier channel 100x its other keys stores those others with the outlier's step. Per page and head, an outlier
costs only its own page: a scale per tensor would spend its range on every page.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0  # the largest finite e4m3 magnitude (float8_e4m3fn has no infinity)
MIN_SCALE = 1.0 / (E4M3_MAX * 512)  # an all-zero page keeps a finite, positive scale
FP8 = torch.float8_e4m3fn


def page_scales(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """float32 [B, H, n] scales of x [B, H, n x page_size, D]: each page's largest magnitude / 448 (at least
    ``MIN_SCALE``)."""
    batch, heads, length, dim = x.shape
    if length % page_size:
        raise ValueError(f"{length} tokens are not whole pages of {page_size}: quantize sealed pages only.")
    amax = x.detach().abs().reshape(batch, heads, length // page_size, page_size * dim).amax(-1).float()
    return (amax / E4M3_MAX).clamp_min(MIN_SCALE)


def quantize_pages(x: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, n x page_size, D] (any float dtype) -> (e4m3 [B, H, n x page_size, D], float32 scales [B, H, n])."""
    scales = page_scales(x, page_size)
    per_token = scales.repeat_interleave(page_size, dim=2)[..., None]  # [B, H, L, 1]
    scaled = (x.float() / per_token).clamp(-E4M3_MAX, E4M3_MAX)
    return scaled.to(FP8), scales


def dequantize_pages(q: torch.Tensor, scales: torch.Tensor, page_size: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`quantize_pages` up to rounding: e4m3 [B, H, n x page_size, D] and scales [B, H, n] ->
    ``dtype`` [B, H, n x page_size, D]."""
    per_token = scales.repeat_interleave(page_size, dim=2)[..., None]
    return (q.float() * per_token).to(dtype)


def error_bound(x: torch.Tensor, scales: torch.Tensor, page_size: int) -> torch.Tensor:
    """The largest error each element of x [B, H, L, D] may take through an FP8 page (the module docstring):
    ``max(|x| * 2^-4, s * 2^-10)`` with ``s`` its page's scale."""
    per_token = scales.repeat_interleave(page_size, dim=2)[..., None]
    return torch.maximum(x.float().abs() * 2.0**-4, per_token * 2.0**-10)


def stored_tokens(codes: torch.Tensor, scales: torch.Tensor, tail: torch.Tensor, seen: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What an FP8 layer holds for slots 0..seen-1, read back as ``dtype`` [B, Hd, seen, D]: the sealed pages
    dequantized, then the open page from the tail buffer (the host's reading, for references and evaluation)."""
    page = tail.shape[2]
    sealed = seen // page * page
    out = torch.empty(*codes.shape[:2], seen, codes.shape[3], dtype=dtype, device=codes.device)
    if sealed:
        out[:, :, :sealed] = dequantize_pages(codes[:, :, :sealed], scales[:, :, : sealed // page], page, dtype)
    out[:, :, sealed:] = tail[:, :, : seen - sealed]
    return out


@triton.jit
def _e4m3(x):
    """float32 x (already scaled, within +-448) -> the nearest e4m3 value (ties to even), as float8e4nv. Rounded in
    float32 first: normal values keep 3 mantissa bits (integer rounding of the bits), values below 2^-6 step by
    2^-9 (the 1.5 x 2^23 trick rounds to an integer, ties to even) and keep x's sign; the cast then meets exact
    values only."""
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    small = ((tl.abs(x) * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # exact: a power of two
    small = (small.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)  # x's sign, -0 too
    return tl.where(tl.abs(x) < 0.015625, small, normal).to(tl.float8e4nv)


@triton.jit
def _quantize_page(x, MIN_SCALE: tl.constexpr):
    """One page of one head, float32 x [PAGE, D] (zeros where masked) -> (e4m3 codes, float32 scale), as
    :func:`quantize_pages` computes them."""
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), MIN_SCALE)
    # IEEE divisions (Triton's plain "/" is approximate on the GPU): the codes PyTorch's quantize_pages gives
    return _e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, tl.broadcast_to(scale, x.shape)), -448.0), 448.0)), scale
