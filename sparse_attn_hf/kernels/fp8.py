"""FP8 (e4m3) pages with one float32 scale per (page, KV head): the storage format of issue 32's sealed dense pages.

A page of ``page_size`` tokens of one KV head is stored as ``round_e4m3(x / s)`` with ``s = max(amax / 448,
MIN_SCALE)``, ``amax`` the largest magnitude in the page (every token and channel); it is read back as ``q * s``.
Quantizing happens in PyTorch when a page seals (never in a kernel: Triton's CPU interpreter rounds fp32 -> fp8
wrongly, so an in-kernel quantization could not be tested in CI), with an explicit clamp to +-448 (older PyTorch
releases may give NaN on overflow instead of saturating); kernels only dequantize (``.to(tl.float32) * s``), which
the interpreter does exactly.

**What it keeps.** e4m3 has 3 mantissa bits: an element whose scaled magnitude ``|x| / s`` is at least 2^-6 (a
normal number) comes back within a relative error of 2^-4; below that (subnormals, steps of 2^-9) within an
absolute error of ``s * 2^-10``. So every element keeps ``|x - x_hat| <= max(|x| * 2^-4, s * 2^-10)``
(:func:`error_bound`). The scale gives range, not precision: no saturation and no calibration, but a page holding
one outlier channel 100x its other keys stores those others with the outlier's step. Per page and head, an outlier
costs only its own page: a scale per tensor would spend its range on every page.
"""

from __future__ import annotations

import torch

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
