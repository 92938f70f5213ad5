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
[B, Hd, capacity, D], ``key_scale``/``value_scale`` float32 [B, Hd, capacity / page_size]. The newest pages stay in
the model's dtype, in a ring ``recent_key``/``recent_value`` [B, Hd, R, D] (slot ``p`` at index ``p % R``, ``R`` =
:func:`recent_tokens`): the pages from :func:`first_recent_page` on, the newest one open. A page is sealed when the
ring needs its place (the first token of the page ``R`` slots later arrives). Decoding attends most to the newest
tokens: on the default model, teacher-forced over held-out text, FP8 pages of 16 tokens with only the open page
unquantized gave a next-token KL of 0.0089 against exact pages; keeping the newest 64 tokens gave 0.0014, 256 gave
0.0008 (``benchmarks/NOTES.md``, session 15).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0  # the largest finite e4m3 magnitude (float8_e4m3fn has no infinity)
MIN_SCALE = 1.0 / (E4M3_MAX * 512)  # an all-zero page keeps a finite, positive scale
FP8 = torch.float8_e4m3fn
RECENT = 256  # the newest tokens a dense head keeps in the model's dtype (at least one page)


def check_device(device: torch.device) -> None:
    """FP8 pages on ``device``: e4m3 in Triton needs compute capability 8.9 or newer on a GPU (a clear error, not a
    compile failure in the first decode step); a CPU runs the references."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"SparseConfig(kv_dtype='fp8') needs a GPU of compute capability 8.9 or newer (H100, L4, "
                         f"RTX 40xx) for its e4m3 kernels; {torch.cuda.get_device_name(device)} is older: use "
                         "kv_dtype='auto'.")


def recent_tokens(page_size: int) -> int:
    """The ring's size for pages of ``page_size``: :data:`RECENT` tokens in whole pages, at least one page."""
    return max(RECENT // page_size, 1) * page_size


def first_recent_page(seen: int, page_size: int, recent: int) -> int:
    """The first page still in the ring once ``seen`` tokens are stored (pages before it are sealed); the kernels'
    twin is :func:`_first_recent_page`."""
    return max((seen - 1) // page_size - recent // page_size + 1, 0) if seen else 0


@triton.jit
def _first_recent_page(seen, PAGE: tl.constexpr, RECENT: tl.constexpr):
    """:func:`first_recent_page` in a kernel (``seen`` >= 1: a decode step has stored its token)."""
    return tl.maximum((seen - 1) // PAGE - RECENT // PAGE + 1, 0)


def page_scales(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """float32 [B, H, n] scales of x [B, H, n x page_size, D]: each page's largest magnitude / 448 (at least
    ``MIN_SCALE``)."""
    batch, heads, length, dim = x.shape
    if length % page_size:
        raise ValueError(f"{length} tokens are not whole pages of {page_size}: quantize sealed pages only.")
    amax = x.detach().abs().reshape(batch, heads, length // page_size, page_size * dim).amax(-1).float()
    # a tensor divisor: PyTorch's CUDA kernels divide by a Python number as a multiplication by its reciprocal (one
    # ulp off IEEE division, which the append kernel and the CPU do)
    return torch.div(amax, torch.full_like(amax, E4M3_MAX)).clamp_min(MIN_SCALE)


def quantize_pages(x: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, n x page_size, D] (any float dtype) -> (e4m3 [B, H, n x page_size, D], float32 scales [B, H, n])."""
    scales = page_scales(x, page_size)
    per_token = scales.repeat_interleave(page_size, dim=2)[..., None]  # [B, H, L, 1]
    scaled = (x.float() / per_token).clamp(-E4M3_MAX, E4M3_MAX)
    return scaled.to(FP8), scales


def dequantize_pages(q: torch.Tensor, scales: torch.Tensor, page_size: int, dtype: torch.dtype = torch.float32,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`quantize_pages` up to rounding: e4m3 [B, H, n x page_size, D] and scales [B, H, n] ->
    ``dtype`` [B, H, n x page_size, D] (or into ``out``). One pass: the codes, exact in any float dtype, times the
    scales, computed in float32 and rounded once to the output's dtype."""
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    codes = q.to(out.dtype if out.dtype in (torch.float16, torch.bfloat16) else torch.float32)
    torch.mul(codes.unflatten(2, (-1, page_size)), scales[..., None, None], out=out.unflatten(2, (-1, page_size)))
    return out


def error_bound(x: torch.Tensor, scales: torch.Tensor, page_size: int) -> torch.Tensor:
    """The largest error each element of x [B, H, L, D] may take through an FP8 page (the module docstring):
    ``max(|x| * 2^-4, s * 2^-10)`` with ``s`` its page's scale."""
    per_token = scales.repeat_interleave(page_size, dim=2)[..., None]
    return torch.maximum(x.float().abs() * 2.0**-4, per_token * 2.0**-10)


def stored_tokens(codes: torch.Tensor, scales: torch.Tensor, recent: torch.Tensor, seen: int, page_size: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What an FP8 layer holds for slots 0..seen-1, read back as ``dtype`` [B, Hd, seen, D]: the sealed pages
    dequantized, then the newest pages from the ring (the host's reading, for references and evaluation)."""
    sealed = first_recent_page(seen, page_size, recent.shape[2]) * page_size
    out = torch.empty(*codes.shape[:2], seen, codes.shape[3], dtype=dtype, device=codes.device)
    if sealed:
        dequantize_pages(codes[:, :, :sealed], scales[:, :, : sealed // page_size], page_size, out=out[:, :, :sealed])
    slots = torch.arange(sealed, seen, device=codes.device)
    out[:, :, sealed:] = recent.index_select(2, slots % recent.shape[2])
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


@triton.jit
def _read_pages_kernel(Q, S, O, pages, stride_qh, stride_qn, stride_sh, stride_oh, stride_on,
                       PAGE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGES_PER_PROGRAM: tl.constexpr):
    """``PAGES_PER_PROGRAM`` pages of one (row, head): codes times the page's scale, in float32, rounded once to O's
    dtype (as :func:`dequantize_pages`)."""
    head = tl.program_id(0)
    tokens = tl.arange(0, PAGE)
    dims = tl.arange(0, D_PAD)
    d_ok = dims[None, :] < D
    for i in range(PAGES_PER_PROGRAM):
        page = tl.program_id(1) * PAGES_PER_PROGRAM + i
        if page < pages:
            slots = page * PAGE + tokens
            codes = tl.load(Q + head * stride_qh + slots[:, None] * stride_qn + dims[None, :], mask=d_ok, other=0.0)
            scale = tl.load(S + head * stride_sh + page)
            values = codes.to(tl.float32) * scale
            tl.store(O + head * stride_oh + slots[:, None] * stride_on + dims[None, :],
                     values.to(O.dtype.element_ty), mask=d_ok)


def read_pages_triton(q: torch.Tensor, scales: torch.Tensor, page_size: int, out: torch.Tensor) -> torch.Tensor:
    """:func:`dequantize_pages` into ``out`` in one pass (the codes read once, ``out`` written once: no temporaries).
    q e4m3 [B, H, n x page_size, D], scales float32 [B, H, n], out [B, H, n x page_size, D]."""
    batch, heads, length, dim = q.shape
    if length == 0:
        return out
    if q.stride(-1) != 1 or out.stride(-1) != 1 or q.stride(0) != heads * q.stride(1) or (
            out.stride(0) != heads * out.stride(1) or scales.stride(0) != heads * scales.stride(1)):
        raise ValueError("read_pages_triton needs rows and heads laid out as one [B*H] axis, unit stride in D.")
    pages = length // page_size
    per_program = 8
    grid = (batch * heads, triton.cdiv(pages, per_program))
    _read_pages_kernel[grid](q, scales, out, pages, q.stride(1), q.stride(2), scales.stride(1), out.stride(1),
                             out.stride(2), PAGE=page_size, D=dim, D_PAD=triton.next_power_of_2(dim),
                             PAGES_PER_PROGRAM=per_program)
    return out
