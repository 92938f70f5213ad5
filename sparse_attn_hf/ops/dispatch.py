"""Which implementation an op runs: the Triton kernel on CUDA with float16/bfloat16, else the PyTorch reference
(with one reason, a WARNING where a GPU user loses the kernels' speed); ``set_backend`` pins one for tests."""

from __future__ import annotations

import contextlib

import torch

from .._log import warn_once

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_MAX_HEAD_DIM = 256
_backend = "auto"


def set_backend(name: str) -> None:
    """``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` (also on the CPU under
    ``TRITON_INTERPRET=1``, for tests) or ``"reference"``."""
    global _backend
    if name not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {name!r}.")
    _backend = name


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model spread over GPUs by
    ``device_map`` has layers on several devices)."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"sparse_attn_hf supports float16, bfloat16 and float32 attention, got {dtype}; "
            "load or cast the model to one of them (for example model.to(torch.bfloat16))."
        )


def _reference_reason(dtype: torch.dtype, head_dim: int, device: torch.device) -> str | None:
    """Why an op on these inputs runs the PyTorch reference rather than its Triton kernel, or None."""
    if _backend == "reference":
        return "set_backend('reference') runs the PyTorch reference"
    if _backend == "triton":
        return None
    if device.type != "cuda":
        return "not CUDA: the PyTorch reference runs"
    if dtype not in KERNEL_DTYPES:
        return f"{dtype} runs the PyTorch reference (the Triton kernel takes fp16/bf16)"
    if head_dim > KERNEL_MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {KERNEL_MAX_HEAD_DIM} runs the PyTorch reference"
    return None


def _decode_kernel_takes(page_size: int) -> bool:
    return page_size >= 16 and page_size & (page_size - 1) == 0


def _selection_kernel_takes(page_size: int, logical_page_size: int, head_dim: int) -> bool:
    per_page = page_size // logical_page_size
    return per_page & (per_page - 1) == 0 and head_dim >= 16


def _use_triton(query: torch.Tensor) -> bool:
    reason = _reference_reason(query.dtype, query.shape[-1], query.device)
    if reason is not None and query.is_cuda and _backend == "auto":  # a GPU user loses the kernels' speed
        warn_once(f"sparse_attn_hf: {reason}.")
    return reason is None


def decode_on_host(dtype: torch.dtype, head_dim: int, device: torch.device, page_size: int,
                   logical_page_size: int) -> str | None:
    """Why a decode step with these settings would run part of the PyTorch reference, which reads device
    values on the host (a CUDA graph cannot capture it); None when every decode op runs its Triton kernel
    (the conditions of ``_paged_decode`` and ``_physical_page_scores``)."""
    reason = _reference_reason(dtype, head_dim, device)
    if reason is not None:
        return reason
    if not _decode_kernel_takes(page_size) or not _selection_kernel_takes(page_size, logical_page_size, head_dim):
        return (f"page_size {page_size}, logical_page_size {logical_page_size} or head_dim {head_dim} runs the "
                "PyTorch reference of page selection or decoding")
    return None
